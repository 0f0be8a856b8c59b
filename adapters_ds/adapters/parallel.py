"""Parallel adapter: out = W x + s · f(x), a bottleneck fed by the sub-layer's input, added to its output.

He et al. 2022 (arXiv 2110.04366, section 3); LLM-Adapters wraps LLaMA's up_proj and down_proj.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from adapters_ds.adapters.bottleneck import Bottleneck, BottleneckConfig
from adapters_ds.adapters.registry import register
from adapters_ds.families import LinearDims


@dataclass
class ParallelConfig(BottleneckConfig):
    method: ClassVar[str] = "parallel"
    target_roles = ("mlp_up", "mlp_down")


class ParallelAdapter(Bottleneck):
    def __init__(self, config: ParallelConfig, dims: LinearDims, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(config, dims.in_features, dims.out_features, dtype, device)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(x)


register(ParallelConfig, ParallelAdapter)
