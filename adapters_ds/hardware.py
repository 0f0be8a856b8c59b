"""What the hardware computes natively, through DeepSpeed's accelerator abstraction (never a hard-coded "cuda")."""

from __future__ import annotations

import torch
from deepspeed.accelerator import get_accelerator


def native_bf16() -> bool:
    """True where bf16 matrix products run in hardware: GPUs from Ampere on, CPUs with AMX or AVX512-BF16.

    Elsewhere bf16 is emulated: on the AVX2-only 2-core CI machines a bf16 matmul runs at about 0.4 GFLOP/s
    against about 25 in fp32, so "auto" precision picks fp32 there.
    """
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return accelerator.is_bf16_supported()
