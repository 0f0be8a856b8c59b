"""What the hardware computes natively, through DeepSpeed's accelerator abstraction (never a hard-coded "cuda"),
and the project's one dtype rule.

The rule: a dtype is named "bfloat16", "float32" or "float16" (`DTYPES`), or "auto" (`DTYPE_NAMES`); "auto" means
bf16 where the device computes bf16 natively (`native_bf16`), fp32 elsewhere, never an emulated bf16.
`resolve_dtype` applies it; the DeepSpeed configs' `"bf16": {"enabled": "auto"}` follows `native_bf16` too. Where
a stored model is read to be written back (exports), "checkpoint" (`CHECKPOINT`) names the dtype it is stored in; an
adapter's own "auto" dtype is that of the weight it adapts (`adapters.base.resolve_dtype`), which this rule chose.
"""

from __future__ import annotations

from typing import Literal

import torch
from deepspeed.accelerator import get_accelerator

from adapters_ds.errors import InputError

DTypeName = Literal["auto", "bfloat16", "float32", "float16"]
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
DTYPE_NAMES: tuple[DTypeName, ...] = ("auto", "bfloat16", "float32", "float16")
CHECKPOINT = "checkpoint"  # the dtype a stored model is in (`modeling.load_base_model`, exports)

# torch's CPU feature probes; private, so looked up by name (a torch without one counts as "not supported").
_CPU_BF16_PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")


def accelerator_device() -> torch.device:
    """The device this rank computes on ("cpu", "cuda:<local rank>", ...), from DeepSpeed's accelerator."""
    return torch.device(get_accelerator().current_device_name())


def native_bf16(device: torch.device | str | None = None) -> bool:
    """True where bf16 matrix products run in hardware on `device` (default: the accelerator's device): GPUs from
    Ampere on, CPUs with AMX or AVX512-BF16.

    Elsewhere bf16 is emulated, which makes matrix products many times slower than in fp32: "auto" picks fp32 there.
    """
    kind = get_accelerator().device_name() if device is None else torch.device(device).type
    if kind == "cpu":
        probes = (getattr(torch.cpu, name, None) for name in _CPU_BF16_PROBES)
        return any(probe() for probe in probes if probe is not None)
    return bool(get_accelerator().is_bf16_supported())


def resolve_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    """The torch dtype `name` stands for on `device` (default: the accelerator's device): a name of `DTYPES`, or
    "auto", which is bf16 where `native_bf16(device)`, else fp32. Any other name is an InputError."""
    if name in DTYPES:
        return DTYPES[name]
    if name != "auto":
        raise InputError(f"dtype: expected one of {', '.join(DTYPE_NAMES)}; found {name!r}")
    return torch.bfloat16 if native_bf16(device) else torch.float32
