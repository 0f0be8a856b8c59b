"""The bottleneck shared by the Series and Parallel adapters: f(z) = s · up(act(down(dropout(z)))).

down: (m, d_in) Kaiming-uniform, up: (d_out, m) zeros, both without bias; s a float or a learned scalar
initialised to 1. The zero up projection makes the adapter the identity at step 0 (LLM-Adapters drew both
from N(0, 0.02), which perturbs the frozen model before training starts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from adapters_ds.adapters.base import Adapter, AdapterConfig, check_range, option
from adapters_ds.errors import InputError


@dataclass
class BottleneckConfig(AdapterConfig):
    """Hyperparameters of a bottleneck adapter; defaults are LLM-Adapters' (size 256, tanh, scale 1)."""

    bottleneck_size: int = option(256, "Series/Parallel bottleneck width m", flag="bottleneck_size")
    non_linearity: str = option(
        "tanh", "Series/Parallel activation (any transformers activation name)", flag="non_linearity"
    )
    dropout: float = option(0.0, "dropout on the bottleneck input", flag="adapter_dropout")
    scaling: float | Literal["learned"] = option(
        1.0, "bottleneck output scale: a number or 'learned' (a trainable scalar initialised to 1)", flag="scaling"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        size = self.bottleneck_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise InputError(f"bottleneck_size must be a positive integer, found {size!r}")
        if self.non_linearity not in ACT2FN:
            raise InputError(f"non_linearity must be one of {sorted(ACT2FN)}, found {self.non_linearity!r}")
        check_range("adapter dropout", self.dropout, 0, 1)
        if self.scaling != "learned":
            if isinstance(self.scaling, str):  # from the command line
                try:
                    self.scaling = float(self.scaling)
                except ValueError:
                    raise InputError(f"scaling must be a number or 'learned', found {self.scaling!r}") from None
            check_range("scaling", self.scaling, float("-inf"))


class Bottleneck(Adapter):
    def __init__(
        self, config: BottleneckConfig, d_in: int, d_out: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        m = config.bottleneck_size
        self.down = nn.Parameter(torch.empty(m, d_in, dtype=dtype, device=device))
        self.up = nn.Parameter(torch.zeros(d_out, m, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.act = ACT2FN[config.non_linearity]
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if config.scaling == "learned":
            self.scale = nn.Parameter(torch.ones((), dtype=dtype, device=device))
        else:
            self.scale = float(config.scaling)

    def trainable_names(self) -> tuple[str, ...]:
        return ("down", "up", "scale") if isinstance(self.scale, nn.Parameter) else ("down", "up")

    def bottleneck(self, z: torch.Tensor) -> torch.Tensor:
        z = self.dropout(z.to(self.down.dtype))
        return F.linear(self.act(F.linear(z, self.down)), self.up) * self.scale  # (..., d_in) → (..., m) → (..., d_out)
