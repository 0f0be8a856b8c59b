"""Building the DeepSpeed engine of a training run, in the one order that works under ZeRO-3:

    partitioned load → packing → inject → freeze → (gradient checkpointing) → persistence plan →
    `deepspeed.initialize` → adapters marked persistent → replication checks

The base model is created under `HfDeepSpeedConfig` (transformers' `deepspeed.zero.Init`), so each layer is
partitioned as it loads and no rank ever holds the whole model. Adapters are created after loading, as ordinary
tensors, and become ZeRO parameters in `deepspeed.initialize`; right after it they are marked persistent, so they
stay whole on every rank (`persistence.py`). The trainer and the benchmarks build their engines through
`build_engine`, so the sequence is written once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.integrations import HfDeepSpeedConfig

from adapters_ds.adapters.base import AdapterConfig, adapter_parameters
from adapters_ds.adapters.inject import freeze_base, inject_adapters
from adapters_ds.quantization import QuantSpec, quantize_model
from adapters_ds.training.attention import AttnChoice
from adapters_ds.training.ds_config import AUTO, compute_dtype, without_persistence_threshold, zero_stage
from adapters_ds.training.loss import enable_router_aux_loss
from adapters_ds.training.packing import enable_packing
from adapters_ds.training.persistence import (
    DEFAULT_MAX_SHARE,
    THRESHOLD_KEY,
    PersistencePlan,
    check_replication,
    check_share,
    plan_persistence,
    set_threshold,
)
from adapters_ds.zero import full_numel, persist_exactly

SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


@dataclass
class Built:
    engine: Any  # deepspeed.DeepSpeedEngine
    packed: bool  # the model keeps the examples of a packed row apart (see packing.py)
    persistence: PersistencePlan | None  # under ZeRO-3: what stays whole on every rank


def build_engine(
    load: Callable[[torch.dtype], PreTrainedModel],
    ds_config: dict[str, Any],
    adapter_config: AdapterConfig,
    *,
    learning_rate: float,
    lr_scheduler: SchedulerFactory | None = None,
    gradient_checkpointing: bool = False,
    max_replicated_base_share: float = DEFAULT_MAX_SHARE,
    attn_implementation: AttnChoice = "auto",
    before_initialize: Callable[[], None] | None = None,
    quantization: QuantSpec | None = None,
) -> Built:
    """`load(dtype)` creates the base model (from a checkpoint or a config); it runs under ZeRO-3's partitioned
    construction when the config asks for stage 3. `ds_config` is a resolved config; its persistence threshold is
    filled in here (the only change made to it). Under ZeRO-3 a plan that keeps more than `max_replicated_base_share`
    of the base whole on every rank is refused before `deepspeed.initialize`. `attn_implementation` is
    `--attn_implementation` (see `attention.py`). With `quantization` the base's linear layers are quantized right
    after loading, before the adapters see them (`quantization.quantize_model`: layer by layer, partitioned under
    ZeRO-3)."""
    hf_ds_config = None
    if zero_stage(ds_config) == 3:
        # must stay referenced until deepspeed.initialize; the threshold's "auto" can only be filled later
        hf_ds_config = HfDeepSpeedConfig(without_persistence_threshold(ds_config))
    model = load(compute_dtype(ds_config))
    if quantization is not None:
        quantize_model(model, quantization, without_persistence_threshold(ds_config) if hf_ds_config else None)
    model.config.use_cache = False
    enable_router_aux_loss(model)  # a mixture of experts' load-balancing loss joins the training loss (`loss.py`)
    packed = enable_packing(model, attn_implementation)  # micro-batches as one packed row: no compute on padding
    inject_adapters(model, adapter_config)
    freeze_base(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # a frozen embedding would give checkpointed blocks no grad input
    plan = None
    if zero_stage(ds_config) == 3:
        plan = plan_persistence(model, ds_config["zero_optimization"].get(THRESHOLD_KEY, AUTO))
        check_share(plan, max_replicated_base_share)
        set_threshold(ds_config, plan)
    if before_initialize is not None:  # the input is checked: the caller may now write (DeepSpeed's monitor will)
        before_initialize()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=adapter_config.param_groups(model, learning_rate),
        config=ds_config,
        lr_scheduler=lr_scheduler,
    )
    del hf_ds_config  # loading is done; the engine holds the ZeRO-3 state from here on
    if plan is not None:
        persist_exactly(engine, plan.keep)  # before the first forward, which records what to release after use
        check_replication(engine.module, plan)
    return Built(engine, packed, plan)


def partition_report(model: nn.Module) -> dict[str, int]:
    """Elements of base and adapter parameters this rank holds, and their full sizes; the same in bytes for the base
    (`base_bytes_per_rank`, `base_bytes_total`). Elements are those of the stored tensors: a quantized weight counts
    the compute-dtype elements its codes and scales occupy (`quantization.QuantLinear`), so bytes are what compare
    a quantized base with a dense one."""
    adapter_ids = {id(p) for p in adapter_parameters(model).values()}
    keys = ("base_local_numel", "base_numel", "base_replicated_numel", "adapter_local_numel", "adapter_numel")
    report = dict.fromkeys(keys + ("base_bytes_per_rank", "base_bytes_total"), 0)
    for p in model.parameters():
        kind = "adapter" if id(p) in adapter_ids else "base"
        persistent = getattr(p, "ds_persist", True)  # whole on every rank (no ZeRO-3: every parameter)
        local = full_numel(p) if persistent else p.ds_tensor.numel()
        report[f"{kind}_local_numel"] += local
        report[f"{kind}_numel"] += full_numel(p)
        if kind == "base":
            report["base_bytes_per_rank"] += local * p.element_size()
            report["base_bytes_total"] += full_numel(p) * p.element_size()
        if kind == "base" and persistent:
            report["base_replicated_numel"] += full_numel(p)
    report["base_replicated_share"] = report["base_replicated_numel"] / max(1, report["base_numel"])
    return report
