"""Parallel adapter: out = W x + s · f(x), a bottleneck fed by the sub-layer's input, added to its output.

He et al. 2022 (arXiv 2110.04366, section 3); LLM-Adapters wraps LLaMA's up_proj and down_proj. Where the family
fuses gate and up into one matrix (Phi-3's gate_up_proj, [gate | up] rows) the adapter adds to the up half only, so
it sits on the same sub-layer as on LLaMA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from adapters_ds.adapters.bottleneck import Bottleneck, BottleneckConfig
from adapters_ds.adapters.registry import register
from adapters_ds.families import LinearDims, fused_up_rows


@dataclass
class ParallelConfig(BottleneckConfig):
    method: ClassVar[str] = "parallel"
    target_roles = ("mlp_up", "mlp_down")

    def layer_options(self, model: nn.Module, name: str) -> dict[str, Any]:
        """On a fused [gate | up] projection (Phi-3) the adapter adds to the up half only: the up sub-layer."""
        return {"up_half": fused_up_rows(model.config.model_type, name)}


class ParallelAdapter(Bottleneck):
    def __init__(
        self, config: ParallelConfig, dims: LinearDims, dtype: torch.dtype, device: torch.device, up_half: bool = False
    ) -> None:
        skip = dims.out_features // 2 if up_half else 0  # output rows left alone: a fused projection's gate
        super().__init__(config, dims.in_features, dims.out_features - skip, dtype, device)
        self.skip = skip

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        update = self.bottleneck(x)  # (..., out - skip)
        return F.pad(update, (self.skip, 0)) if self.skip else update


register(ParallelConfig, ParallelAdapter)
