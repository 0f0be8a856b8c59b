"""Which parameters ZeRO-3 keeps whole on every rank: every adapter tensor, and the frozen tensors at or below the
persistence threshold; everything else of the base is partitioned.

Adapters are tiny next to the base and read at every step, so they stay replicated (no gather per use, no
partitioned optimizer master to sync for inference-time reads). They are marked persistent one by one right after
`deepspeed.initialize` (`zero.persist_exactly`), whatever their size: a bottleneck adapter of 256 is often larger than
a grouped-query k/v projection, so no single threshold could keep the adapters whole and the base partitioned.

The threshold then only decides about the frozen base. With `"stage3_param_persistence_threshold": "auto"` (the
shipped configs) it keeps the frozen vectors whole (norms, biases: one gather each per use would cost more than they
weigh) and partitions every frozen matrix. An explicit number is taken as given. What stays whole of the base is
counted (`PersistencePlan.base_replicated_share`, reported in `zero3_partition.json` and the log) and a run refuses
to start when it exceeds `--max_replicated_base_share`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from adapters_ds.adapters.base import adapter_parameters
from adapters_ds.errors import InputError
from adapters_ds.training.ds_config import AUTO
from adapters_ds.zero import full_numel, full_shape

THRESHOLD_KEY = "stage3_param_persistence_threshold"
DEFAULT_MAX_SHARE = 0.05


@dataclass
class PersistencePlan:
    threshold: int  # stage3_param_persistence_threshold: frozen tensors with numel <= it stay whole
    adapters: dict[str, nn.Parameter]
    frozen_kept: dict[str, nn.Parameter]  # frozen tensors that stay whole
    base_numel: int
    largest_kept: list[tuple[str, int]] = field(default_factory=list)  # the largest frozen tensors kept whole

    @property
    def keep(self) -> list[nn.Parameter]:
        return [*self.adapters.values(), *self.frozen_kept.values()]

    @property
    def base_replicated_numel(self) -> int:
        return sum(full_numel(p) for p in self.frozen_kept.values())

    @property
    def base_replicated_share(self) -> float:
        return self.base_replicated_numel / self.base_numel if self.base_numel else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "persistence_threshold": self.threshold,
            "adapter_tensors": len(self.adapters),
            "adapter_numel": sum(full_numel(p) for p in self.adapters.values()),
            "base_numel": self.base_numel,
            "base_replicated_tensors": len(self.frozen_kept),
            "base_replicated_numel": self.base_replicated_numel,
            "base_replicated_share": self.base_replicated_share,
        }


def auto_threshold(frozen: dict[str, nn.Parameter]) -> int:
    """The largest frozen vector's numel, kept below the smallest frozen matrix's: vectors whole, matrices
    partitioned."""
    vectors = [full_numel(p) for p in frozen.values() if len(full_shape(p)) < 2]
    matrices = [full_numel(p) for p in frozen.values() if len(full_shape(p)) >= 2]
    threshold = max(vectors, default=0)
    return min(threshold, min(matrices) - 1) if matrices else threshold


def plan_persistence(model: nn.Module, configured: int | str = AUTO) -> PersistencePlan:
    """The plan for a model with its adapters injected (works on ZeRO-3 partitions and on the meta device)."""
    adapters = adapter_parameters(model)
    if not adapters:
        raise InputError("the model has no adapters to keep replicated")
    adapter_ids = {id(p) for p in adapters.values()}
    frozen = {n: p for n, p in model.named_parameters() if id(p) not in adapter_ids}
    if configured == AUTO:
        threshold = auto_threshold(frozen)
    elif isinstance(configured, int) and not isinstance(configured, bool) and configured >= 0:
        threshold = configured
    else:
        raise InputError(f'ds_config {THRESHOLD_KEY} must be "auto" or an integer >= 0, found {configured!r}')
    kept = {n: p for n, p in frozen.items() if full_numel(p) <= threshold}
    largest = sorted(((n, full_numel(p)) for n, p in kept.items()), key=lambda t: -t[1])[:3]
    base_numel = sum(full_numel(p) for p in frozen.values())
    return PersistencePlan(threshold, adapters, kept, base_numel, largest)


def check_share(plan: PersistencePlan, limit: float) -> None:
    """Refuse a plan that keeps more than `limit` of the base's elements whole on every rank."""
    if plan.base_replicated_share > limit:
        largest = ", ".join(f"{n!r} ({k:,})" for n, k in plan.largest_kept)
        raise InputError(
            f"ZeRO-3 would keep {plan.base_replicated_numel:,} of the base's {plan.base_numel:,} elements "
            f"({100 * plan.base_replicated_share:.2f} %) whole on every rank, above --max_replicated_base_share "
            f"{limit:g}: {THRESHOLD_KEY} {plan.threshold:,} keeps {len(plan.frozen_kept)} frozen tensors "
            f'(largest {largest}); lower the threshold ("auto" keeps only vectors) or raise the limit'
        )


def set_threshold(config: dict[str, Any], plan: PersistencePlan) -> None:
    config.setdefault("zero_optimization", {})[THRESHOLD_KEY] = plan.threshold


def check_replication(model: nn.Module, plan: PersistencePlan) -> None:
    """After `zero.persist_exactly`: every adapter tensor whole on this rank, the base persistent exactly as planned."""
    partitioned = [n for n, p in plan.adapters.items() if not getattr(p, "ds_persist", False) or p.numel() == 0]
    if partitioned:
        raise RuntimeError(f"ZeRO-3 partitioned adapter tensors (they must stay replicated): {partitioned[:3]}")
    adapter_ids = {id(p) for p in plan.adapters.values()}
    kept_ids = {id(p) for p in plan.frozen_kept.values()}
    wrong = [
        n
        for n, p in model.named_parameters()
        if id(p) not in adapter_ids and bool(getattr(p, "ds_persist", False)) != (id(p) in kept_ids)
    ]
    if wrong:
        raise RuntimeError(f"ZeRO-3 persistence of frozen tensors differs from the plan: {wrong[:3]}")
