"""Putting adapters into a `transformers` model and taking stock of them.

The model stays the unmodified `transformers` class: adapters are attached to its linear layers (or, for
model-level methods such as prompt tuning, to the model itself; see `base.py`) and found again by type, so there
is no wrapper model and no string matching on parameter names.
"""

from __future__ import annotations

from torch import nn

from adapters_ds.adapters.base import (
    ADAPTER_ATTR,
    Adapter,
    AdapterConfig,
    adapter_layers,
    attach,
    detach,
    reference_weight,
    resolve_dtype,
)
from adapters_ds.adapters.registry import get_method
from adapters_ds.errors import InputError
from adapters_ds.zero import full_numel


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def resolve_targets(model: nn.Module, config: AdapterConfig) -> dict[str, str]:
    """Map each module path to adapt to the target name that selected it; every target must match, as a module's
    name or else as a parameter's qualified by its module's (`experts.down_proj`: it selects the module, and the
    method's `layer_dims` decides what it adapts there). A model-level method adapts the model itself (path "")."""
    if config.model_level:
        return {"": config.method}
    targets = config.target_modules or config.default_targets(model.config.model_type)
    selected: dict[str, str] = {}
    unmatched = []
    for target in targets:
        names = [n for n, _ in model.named_modules() if n and _matches(n, target)]
        if not names and "." in target:  # `<module>.<parameter>` (a mixture of experts' `experts.down_proj`)
            params = [n for n, _ in model.named_parameters() if _matches(n, target)]
            names = list(dict.fromkeys(n.rpartition(".")[0] for n in params))
        if not names:
            unmatched.append(target)
        selected.update({n: target for n in names})
    if unmatched:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "weight")})
        raise InputError(
            f"target module(s) {unmatched} matched no module of this {model.config.model_type} model; "
            f"its modules with weights are named {linear_names}"
        )
    return selected


def inject_adapters(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Attach one adapter of `config`'s method to each target module; returns the adapted module paths.

    Works on a ZeRO-3-partitioned model: layer shapes come from module attributes, never from the weights.
    """
    layer_cls = get_method(config.method).layer
    selected = resolve_targets(model, config)
    modules = dict(model.named_modules())
    dims = {}
    for name in selected:
        base = modules[name]
        dims[name] = config.layer_dims(name, base)  # refuses a module the method cannot adapt, before any change
        if isinstance(getattr(base, ADAPTER_ATTR, None), Adapter):
            raise InputError(f"module {name!r} already has an adapter")
    for name in selected:
        base = modules[name]
        dtype = resolve_dtype(config.dtype, base)
        options = config.layer_options(model, name)
        attach(base, layer_cls(config, dims[name], dtype, reference_weight(base).device, **options))
    return list(selected)


def freeze_base(model: nn.Module) -> None:
    """Freeze everything, then unfreeze exactly the parameters each adapter declares as trainable."""
    model.requires_grad_(False)
    found = False
    for name, _, adapter in adapter_layers(model):
        found = True
        declared = set(adapter.trainable_names())
        present = {n for n, _ in adapter.named_parameters()}
        if declared != present:  # a layer that forgot to declare a parameter would train silently wrong
            raise RuntimeError(f"adapter at {name!r} declares {sorted(declared)} but holds {sorted(present)}")
        for param in adapter.parameters():
            param.requires_grad_(True)
    if not found:
        raise InputError("the model has no adapters to train")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; full sizes also for ZeRO-3 partitions."""
    params = list(model.parameters())
    return sum(full_numel(p) for p in params if p.requires_grad), sum(full_numel(p) for p in params)


def parameter_report(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight (LoRA only); idempotent."""
    for _, base, adapter in adapter_layers(model):
        adapter.merge(base)


def unmerge_adapters(model: nn.Module) -> None:
    """Undo `merge_adapters`; idempotent."""
    for _, base, adapter in adapter_layers(model):
        adapter.unmerge(base)


def remove_adapters(model: nn.Module) -> None:
    """Detach every adapter (after a merge this leaves a plain model with the adapted weights)."""
    for _, base, _ in list(adapter_layers(model)):
        detach(base)
