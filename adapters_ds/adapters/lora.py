"""LoRA: a low-rank update of a frozen linear layer (Hu et al. 2021, arXiv 2106.09685, section 4.1).

    y = W x + (alpha / r) · B A dropout(x),    A: (r, in) Kaiming-uniform, B: (out, r) zeros

B = 0 makes the adapted model equal to the base at step 0. The update is linear, so it can be merged into
W (and unmerged) exactly up to rounding; merging is always explicit, never a side effect of eval().
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from adapters_ds.adapters.base import Adapter, AdapterConfig, check_range, option
from adapters_ds.adapters.registry import register
from adapters_ds.errors import InputError
from adapters_ds.families import LinearDims
from adapters_ds.zero import gathered


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA hyperparameters; defaults are LLM-Adapters' math setting (r 32, alpha 64, dropout 0.05)."""

    method: ClassVar[str] = "lora"
    target_roles = ("q", "k", "v", "mlp_up", "mlp_down")

    r: int = option(32, "LoRA rank", flag="lora_r")
    alpha: float = option(64.0, "LoRA alpha (the update is scaled by alpha / r)", flag="lora_alpha")
    dropout: float = option(0.05, "dropout on the LoRA branch (the base path never sees it)", flag="lora_dropout")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise InputError(f"lora r must be a positive integer, found {self.r!r}")
        check_range("lora alpha", self.alpha, 0, low_inclusive=False)
        check_range("lora dropout", self.dropout, 0, 1)


def add_lora_parameters(module: nn.Module, r: int, dims: LinearDims, dtype: torch.dtype, device: torch.device) -> None:
    """Register the LoRA pair on `module`: `lora_A` (r, in) Kaiming-uniform (nn.Linear's default, as in the paper's
    code) and `lora_B` (out, r) zeros. Shared by `lora` and the LoRA inside stochastic gates, so both keep PEFT's
    parameter names and initialisation."""
    module.lora_A = nn.Parameter(torch.empty(r, dims.in_features, dtype=dtype, device=device))
    module.lora_B = nn.Parameter(torch.zeros(dims.out_features, r, dtype=dtype, device=device))
    nn.init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))


def lora_update(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s · B A x: (..., in) → (..., r) → (..., out), in PEFT's operation order so exports match bit for bit."""
    return F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B) * scaling


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """s · B A in fp32, (out, in)."""
    return (lora_B.float() @ lora_A.float()) * scaling


class LoRA(Adapter):
    mergeable: ClassVar[bool] = True

    def __init__(self, config: LoRAConfig, dims: LinearDims, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.scaling = config.alpha / config.r
        self.transposed = dims.transposed
        add_lora_parameters(self, config.r, dims, dtype, device)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def trainable_names(self) -> tuple[str, ...]:
        return ("lora_A", "lora_B")

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return lora_update(self.dropout(x.to(self.lora_A.dtype)), self.lora_A, self.lora_B, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r)·B·A in fp32, laid out like the base weight ((in, out) for Conv1D)."""
        delta = lora_delta(self.lora_A, self.lora_B, self.scaling)  # (out, in)
        return delta.T if self.transposed else delta

    def merge(self, base: nn.Module) -> None:
        if not self.merged:
            self._add_to_weight(base, sign=1.0)
            self.merged = True

    def unmerge(self, base: nn.Module) -> None:
        if self.merged:
            self._add_to_weight(base, sign=-1.0)
            self.merged = False

    @torch.no_grad()
    def _add_to_weight(self, base: nn.Module, sign: float) -> None:
        # fp32 math then one cast back: a bf16 add would round the small update away
        with gathered([base.weight, self.lora_A, self.lora_B], modify=True):
            weight = base.weight
            weight.copy_((weight.float() + sign * self.delta_weight()).to(weight.dtype))


register(LoRAConfig, LoRA)
