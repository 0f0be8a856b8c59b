"""A dense fine-tuned teacher for the unit gates' distillation (`--gate_teacher ADAPTER_DIR`, `--adapter gates`).

CoFi (Xia et al. 2022, arXiv 2204.00408, section 3.2) distills the pruned model from the dense model fine-tuned for
the task. Here that model is the frozen base with a LoRA adapter trained first (`--adapter lora`, the folder
`storage.save_adapter` writes), so the teacher computes, in every layer the gates adapt,

    y_t = W x + b + s_t · B_t A_t x      (where the teacher's LoRA adapts the layer; W x + b elsewhere)

with every gate open and the LoRA inside the gates left out. No second copy of the base: each gated layer the teacher
adapts holds the teacher's pair (`Gates.teacher_A` (r_t, in), `Gates.teacher_B` (out, r_t), s_t its alpha / r or
alpha / √r) as non-persistent buffers: frozen, never trainable nor counted as such, not in the gates adapter's file
or the engine's checkpoints (the strategy loads them again at every start, resumes included), and whole on every
rank under ZeRO-3, which partitions parameters only. `teaching(layers)` switches the layers to that forward for the
teacher's one forward per micro-batch (`gate_schedule.distillation`), as `gate_schedule.opened` does for the
self-teacher; the layer computes it in `lora.LoRA`'s evaluation order, so the teacher's logits are those of the base
with the adapter loaded by `adapters_ds.load_adapter`, bit for bit.

Warm start (`--gate_warm_start`): the LoRA inside the gates starts as the teacher's, so that at step 0, every gate
open, the student *is* the teacher and pruning starts from the fine-tuned model (prune after fine-tuning, as the
gradual-pruning literature does) instead of learning the task and losing units at once. `warm_start` copies the
teacher's pair into the first r_t ranks of the gates' (r ≥ r_t), with B rescaled by s_t / s for the gates' own
scale s; the other ranks keep LoRA's initialisation (A random, B zero), so they add nothing yet and still learn.

`load_teacher` refuses by name, before changing any layer, a folder that is no LoRA adapter (DoRA included: its
magnitude rescales the base path, which the gated layer does not), one trained on another model type, one that adapts
a module the gates do not, and one whose tensors do not fit this base's shapes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters_ds.adapters.base import ADAPTER_ATTR, reference_weight, resolve_dtype
from adapters_ds.adapters.lora import LoRAConfig
from adapters_ds.adapters.storage import check_base_model, read_adapter_config, read_adapter_tensors
from adapters_ds.errors import InputError


def load_teacher(model: nn.Module, path: str | Path, layers: Mapping[str, Any]) -> None:
    """Put the LoRA adapter saved in `path` into `layers` (the gated layers, by the path of the module each adapts) of
    `model` as the teacher's frozen pair, in the dtype `load_adapter` would give it (the teacher's own `dtype`
    setting; "auto": the base weight's) on the base weight's device. Works on a ZeRO-3-partitioned model (shapes
    come from the layers, never from the weights). An `InputError` that names the folder when it does not fit."""
    where = f"--gate_teacher {str(path)!r}"
    try:
        config, meta = read_adapter_config(path)
        check_base_model(model, meta, path)
    except InputError as exc:  # the option it came from, in front of what is wrong with the folder
        raise InputError(f"{where}: {exc}") from None
    if not isinstance(config, LoRAConfig):
        raise InputError(f"{where} is a {config.method!r} adapter; the teacher must be a LoRA adapter (--adapter lora)")
    if config.use_dora:
        raise InputError(f"{where} is a DoRA adapter; the teacher must be a plain LoRA adapter (without --use_dora)")
    modules = list(meta["adapted_modules"] or [])
    outside = [name for name in modules if name not in layers]
    if outside:
        raise InputError(
            f"{where} adapts {len(outside)} module(s) the gates do not (e.g. {outside[:3]}); the teacher's targets "
            f"must be among the gated layers ({len(layers)} here, e.g. {list(layers)[:2]})"
        )
    try:
        tensors = read_adapter_tensors(path)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    names = {f"{name}.{ADAPTER_ATTR}.{part}": (name, part) for name in modules for part in ("lora_A", "lora_B")}
    if set(tensors) != set(names):
        extra, missing = sorted(set(tensors) - set(names))[:3], sorted(set(names) - set(tensors))[:3]
        raise InputError(f"{where}: its tensors do not fit its own config: unexpected {extra}, missing {missing}")
    for key, (name, part) in names.items():
        dims = layers[name].dims
        shape = (config.r, dims.in_features) if part == "lora_A" else (dims.out_features, config.r)
        if tuple(tensors[key].shape) != shape:
            raise InputError(
                f"{where}: tensor {key!r} has shape {tuple(tensors[key].shape)}; this base model's {name!r} needs "
                f"{shape} (the teacher was trained on another base)"
            )
    for name in modules:  # everything checked: no layer is changed by a refused teacher
        module = model.get_submodule(name)
        like = {"dtype": resolve_dtype(config.dtype, module), "device": reference_weight(module).device}
        layer = layers[name]
        layer.teacher_A = tensors[f"{name}.{ADAPTER_ATTR}.lora_A"].to(**like)  # (r_t, in)
        layer.teacher_B = tensors[f"{name}.{ADAPTER_ATTR}.lora_B"].to(**like)  # (out, r_t)
        layer.teacher_scaling = config.scaling


@contextlib.contextmanager
def teaching(layers: Iterable[Any]) -> Iterator[None]:
    """`layers` (every gated layer of the model) compute the teacher inside the block: gates open, the LoRA inside
    the gates left out, the teacher's LoRA added where it adapts the layer."""
    layers = list(layers)
    for layer in layers:
        layer.teaching = True
    try:
        yield
    finally:
        for layer in layers:
            layer.teaching = False


@torch.no_grad()
def warm_start(layers: Sequence[Any]) -> None:
    """The gates' own LoRA of every layer in `layers` that holds a teacher pair (`load_teacher`) becomes that pair:
    s · B A = s_t · B_t A_t in the first r_t ranks, the others left as initialised (B zero). Layers the teacher does
    not adapt keep their initialisation. An `InputError` when the gates' rank is below the teacher's."""
    held = [layer for layer in layers if layer.teacher_A is not None]
    too_small = [layer for layer in held if layer.teacher_A.shape[0] > layer.lora_r]
    if too_small:
        raise InputError(
            f"--gate_warm_start: the teacher's LoRA has rank {too_small[0].teacher_A.shape[0]}, the LoRA inside the "
            f"gates {too_small[0].lora_r}; give --gate_lora_r >= the teacher's rank"
        )
    for layer in held:
        rank = layer.teacher_A.shape[0]
        layer.lora_A[:rank].copy_(layer.teacher_A.to(layer.lora_A.dtype))
        ratio = layer.teacher_scaling / layer.scaling
        layer.lora_B[:, :rank].copy_((layer.teacher_B.float() * ratio).to(layer.lora_B.dtype))
        layer.lora_B[:, rank:].zero_()
