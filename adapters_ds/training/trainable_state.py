"""The trainable parameters' optimizer state, consolidated: what resuming on another number of ranks loads.

DeepSpeed's engine checkpoint holds each rank's partition of the fp32 master weights and of the optimizer's moments,
laid out for the number of ranks (and ZeRO stage) that wrote it, and DeepSpeed refuses to load it into another
layout. The trainable parameters here are the adapters: small, and whole on every rank. So every checkpoint also
holds them consolidated, independent of any layout, and without pickles:

- `trainable_state.safetensors`: per trainable parameter (by its name in the model) the full fp32 master weights
  (`fp32/<name>`) and each optimizer moment (`exp_avg/<name>`, `exp_avg_sq/<name>` for Adam);
- `trainable_state.json`: the optimizer's step count, its parameter groups' hyperparameters (the current learning
  rate among them), the learning-rate scheduler's state, and the engine's step, sample and skipped-step counters.

`load_trainable_state` writes them into a freshly built engine of any number of ranks and ZeRO stage 1-3 (or no
ZeRO in fp32): each rank takes its partition of every tensor, as DeepSpeed would have cut it. The optimizer's
state is created first by one step of the optimizer itself with zero gradients and a learning rate of 0, so it
has exactly the types and keys that optimizer uses (an int step count for DeepSpeed's Adam, a tensor for torch's),
and is then overwritten. What does not carry over: a fp16 loss scaler starts again from its initial scale, and
optimizer state swapped to NVMe is not supported (refused before the run starts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from safetensors.torch import load_file, save_file

from adapters_ds.errors import InputError
from adapters_ds.fileio import read_json, write_json
from adapters_ds.zero import is_partitioned, is_resident

TENSORS = "trainable_state.safetensors"
META = "trainable_state.json"
FORMAT = 1
WEIGHTS = "fp32"  # the key of the master weights beside the optimizer's own state keys


def unsupported(ds_config: dict[str, Any]) -> str | None:
    """Why a run with this (resolved) config cannot load consolidated state, or None when it can."""
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if (zero.get("offload_optimizer") or {}).get("device") == "nvme":
        return "its optimizer state is swapped to NVMe (offload_optimizer.device nvme)"
    if stage == 0 and any((ds_config.get(key) or {}).get("enabled") for key in ("bf16", "fp16")):
        return "it trains in 16 bits without ZeRO (DeepSpeed's mixed-precision optimizer without ZeRO is not covered)"
    return None


def consolidates(engine) -> bool:
    """Whether this engine's optimizer state can be consolidated (see `unsupported` for the exceptions)."""
    optimizer = engine.optimizer
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        return not optimizer.swap_optimizer
    return isinstance(optimizer, DeepSpeedZeroOptimizer | torch.optim.Optimizer)


def trainable_parameters(engine) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters the optimizer trains, by name in the model, in the model's order."""
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------------------ saving


@torch.no_grad()
def gather_trainable_state(engine) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The consolidated state of `engine` as it is now: (tensors, metadata), as the two files hold them.
    Collective: every rank calls it (the partitions are gathered) and gets the whole state."""
    inner = _inner(engine.optimizer)
    keys, step = _state_keys_and_step(inner)
    if keys:
        _link_optimizer_state(engine.optimizer)
    params = trainable_parameters(engine)
    tensors = {
        f"{key}/{name}": _full(engine.optimizer, inner, param, key).detach().float().cpu().contiguous()
        for name, param in params
        for key in (WEIGHTS, *keys)
    }
    meta = {
        "format": FORMAT,
        "names": [name for name, _ in params],
        "optimizer_state_keys": keys,
        "optimizer_step": step,
        "param_groups": [_hyperparameters(group) for group in engine.optimizer.param_groups],
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
    }
    return tensors, meta


def _hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """A parameter group's settings that JSON holds (numbers, flags, names, Adam's betas): all that Adam keeps."""
    plain = (bool, int, float, str, type(None))
    kept = {}
    for key, value in group.items():
        if key == "params":
            continue
        if isinstance(value, tuple | list) and all(isinstance(x, plain) for x in value):
            kept[key] = list(value)
        elif isinstance(value, plain):
            kept[key] = value
    return kept


def save_trainable_state(engine, folder: Path, is_main: bool) -> None:
    """Write the two files into `folder`. Collective (`gather_trainable_state`); rank 0 writes."""
    tensors, meta = gather_trainable_state(engine)
    if is_main:
        save_file(tensors, str(folder / TENSORS))
        write_json(folder / META, meta)


def _inner(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer that holds the state: inside DeepSpeed's ZeRO optimizers, or the engine's own."""
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3 | DeepSpeedZeroOptimizer):
        return optimizer.optimizer
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    raise InputError(
        f"resuming on another number of ranks needs ZeRO stage 1-3 or a plain optimizer; this run's DeepSpeed "
        f"optimizer is a {type(optimizer).__name__}"
    )


def _state_keys_and_step(inner: torch.optim.Optimizer) -> tuple[list[str], int]:
    """The optimizer's per-element state keys (Adam: exp_avg, exp_avg_sq) and its step count; none and 0 before
    its first step. The count is the largest one kept: DeepSpeed's FusedAdam without ZeRO counts a whole parameter
    group's steps in one of its parameters' state and leaves the others at 0 (under ZeRO each group is one flat
    tensor)."""
    states = [state for state in inner.state.values() if state]
    if not states:
        return [], 0
    keys = sorted(k for k, v in states[0].items() if torch.is_tensor(v) and v.dim() > 0)
    return keys, max((int(state["step"]) for state in states if "step" in state), default=0)


def _full(optimizer, inner: torch.optim.Optimizer, param: torch.nn.Parameter, key: str) -> torch.Tensor:
    """The whole fp32 tensor (master weights, or optimizer state `key`) of one trainable parameter."""
    if is_partitioned(param) or hasattr(param, "_hp_mapping"):  # ZeRO 3, or ZeRO 1-2: gathered collectively
        return safe_get_full_fp32_param(param) if key == WEIGHTS else safe_get_full_optimizer_state(param, key)
    return param if key == WEIGHTS else inner.state[param][key]  # no ZeRO: the parameter is its own master


# ------------------------------------------------------------------------------------------------------ loading


@torch.no_grad()
def load_trainable_state(engine, folder: Path) -> None:
    """Write the consolidated state in `folder` into `engine`, a freshly built engine of this run. Every rank calls
    it; nothing is communicated."""
    tensors, meta = read_trainable_state(folder)
    params = trainable_parameters(engine)
    _check_match(folder, meta, tensors, params)
    optimizer = engine.optimizer
    inner = _inner(optimizer)
    keys = meta["optimizer_state_keys"]
    if keys:
        _create_optimizer_state(optimizer, inner)
        for state in inner.state.values():
            if torch.is_tensor(state["step"]):
                state["step"].fill_(meta["optimizer_step"])
            else:
                state["step"] = meta["optimizer_step"]
        _link_optimizer_state(optimizer)
    for name, param in params:
        for key in (WEIGHTS, *keys):
            _set_full(optimizer, inner, param, key, tensors[f"{key}/{name}"])
    if len(meta["param_groups"]) != len(optimizer.param_groups):
        raise InputError(
            f"checkpoint {str(folder)!r} has {len(meta['param_groups'])} optimizer parameter groups; this run has "
            f"{len(optimizer.param_groups)} (a different adapter configuration?)"
        )
    for group, saved in zip(optimizer.param_groups, meta["param_groups"], strict=True):
        for k, v in saved.items():
            if k != "params":
                group[k] = tuple(v) if isinstance(group.get(k), tuple) else v  # JSON keeps Adam's betas as a list
    if meta["lr_scheduler"] is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    engine.global_steps = meta["global_steps"]
    engine.global_samples = meta["global_samples"]
    engine.skipped_steps = meta["skipped_steps"]


def read_trainable_state(folder: Path) -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors, metadata) of the consolidated state in a checkpoint folder."""
    return load_file(str(folder / TENSORS)), read_json(folder / META, "consolidated trainable state")


def _check_match(folder: Path, meta: Any, tensors: dict[str, torch.Tensor], params: list) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{str(folder / META)!r}: expected consolidated trainable state format {FORMAT}")
    names = [name for name, _ in params]
    if meta["names"] != names:
        missing, extra = sorted(set(names) - set(meta["names"])), sorted(set(meta["names"]) - set(names))
        raise InputError(
            f"checkpoint {str(folder)!r} trained other parameters than this run (a different adapter "
            f"configuration?): this run's {missing[:3]} are not in it, its {extra[:3]} are not in this run"
        )
    for name, param in params:
        shape = tuple(param.ds_shape if is_partitioned(param) else param.shape)
        found = tuple(tensors[f"{WEIGHTS}/{name}"].shape)
        if found != shape:
            raise InputError(f"checkpoint {str(folder)!r}: {name} has shape {found}; this run's has {shape}")


def _link_optimizer_state(optimizer) -> None:
    """ZeRO 1-2: (re)link every trainable parameter to its part of the optimizer state, which `safe_get/set_full_
    optimizer_state` read through. DeepSpeed links them once, after the first parameter group's first step, when
    the other groups have no state yet: with more than one group (the gates' own learning rate, LoRA+) theirs would
    stay unlinked. Linking is cheap (views), so it is redone whenever the state is read or written whole."""
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def _optimizer_tensors(optimizer, inner: torch.optim.Optimizer) -> list[tuple[torch.Tensor, int]]:
    """(tensor the optimizer steps, index of its parameter group) for every tensor that holds optimizer state."""
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        groups = optimizer.sub_group_to_group_id
        return [(flat, groups[i]) for i, flat in enumerate(optimizer.fp32_partitioned_groups_flat)]
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        return [(flat, i) for i, flat in enumerate(optimizer.single_partition_of_fp32_groups)]
    return [(p, i) for i, group in enumerate(inner.param_groups) for p in group["params"]]


def _create_optimizer_state(optimizer, inner: torch.optim.Optimizer) -> None:
    """One step of the optimizer itself with zero gradients and learning rate 0: it creates its state as it
    always does (the values are overwritten next). ZeRO-3 hands its optimizer one sub-group at a time and leaves
    the groups empty in between: they are filled for this step and put back as they were."""
    tensors = _optimizer_tensors(optimizer, inner)
    kept = [(group["params"], group["lr"]) for group in inner.param_groups]
    grads = [t.grad for t, _ in tensors]
    try:
        for i, group in enumerate(inner.param_groups):
            group["params"], group["lr"] = [t for t, g in tensors if g == i], 0.0
        for t, _ in tensors:
            t.grad = torch.zeros_like(t)
        inner.step()
    finally:
        for group, (params, lr) in zip(inner.param_groups, kept, strict=True):
            group["params"], group["lr"] = params, lr
        for (t, _), grad in zip(tensors, grads, strict=True):
            t.grad = grad


def _set_full(optimizer, inner: torch.optim.Optimizer, param: torch.nn.Parameter, key: str, value: torch.Tensor):
    """Give one trainable parameter the whole fp32 tensor `value` as its master weights (and working copy) or as
    optimizer state `key`; each rank keeps its partition."""
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        _set_zero3(optimizer, inner, param, key, value)
    elif isinstance(optimizer, DeepSpeedZeroOptimizer):
        if key == WEIGHTS:
            safe_set_full_fp32_param(param, value.to(param.device))
            param.data.copy_(value.to(param.device, param.dtype))  # ZeRO 1-2 keep the working copy whole
        else:
            safe_set_full_optimizer_state(param, value.to(param.device), key)
    elif key == WEIGHTS:
        param.data.copy_(value.to(param.device, param.dtype))
    else:
        inner.state[param][key].copy_(value)


def _set_zero3(optimizer, inner: torch.optim.Optimizer, param: torch.nn.Parameter, key: str, value: torch.Tensor):
    """ZeRO-3 cuts a parameter flattened and zero-padded to a multiple of the ranks into equal consecutive parts,
    rank r holding part r: in the fp32 master partition and its optimizer state, and in `ds_tensor`, the partition
    of the working copy. (DeepSpeed's own `safe_set_full_*` assume no padding.)"""
    part = param.ds_tensor.numel()
    ranks = torch.distributed.get_world_size(group=param.ds_process_group)
    rank = torch.distributed.get_rank(group=param.ds_process_group)
    padded = value.new_zeros(part * ranks)
    padded[: value.numel()] = value.flatten()
    mine = padded[part * rank : part * (rank + 1)]
    group, offset, numel = optimizer.grad_position[optimizer.get_param_id(param)]
    flat = optimizer.fp32_partitioned_groups_flat[group]
    target = flat if key == WEIGHTS else inner.state[flat][key]
    target.narrow(0, offset, numel).copy_(mine[:numel].to(target.device, target.dtype))
    if key == WEIGHTS:
        param.ds_tensor.data.copy_(mine.to(param.ds_tensor.device, param.ds_tensor.dtype))
        if is_resident(param):  # a persistent parameter is whole on every rank as well
            param.data.copy_(value.view(param.ds_shape).to(param.device, param.dtype))
