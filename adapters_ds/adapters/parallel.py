"""Parallel adapter: out = W x + s · f(x), a bottleneck fed by the sub-layer's input, added to its output.

He et al. 2022 (arXiv 2110.04366, section 3); LLM-Adapters wraps LLaMA's up_proj and down_proj.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from adapters_ds.adapters.base import Adapter, Shard
from adapters_ds.adapters.bottleneck import Bottleneck, BottleneckConfig
from adapters_ds.adapters.registry import register
from adapters_ds.distributed import group_sum
from adapters_ds.families import LinearDims


@dataclass
class ParallelConfig(BottleneckConfig):
    method: ClassVar[str] = "parallel"
    target_roles = ("mlp_up", "mlp_down")


class ParallelAdapter(Bottleneck):
    tensor_parallel: ClassVar[str] = "applied per shard"

    def __init__(self, config: ParallelConfig, dims: LinearDims, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(config, dims.in_features, dims.out_features, dtype, device)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(x)

    def before_sharding(self, base: nn.Module) -> str:
        return "reattach"

    def shard(self, name: str, shard: Shard) -> Adapter:
        if shard.split == "column":  # whole input, a slice of the output: the same rows of the up projection
            start, size = shard.start, shard.size
            self.up = nn.Parameter(self.up.detach()[start : start + size].clone(), requires_grad=False)
            return self
        if shard.split == "row":
            return RowParallelBottleneck(self, shard)
        return super().shard(name, shard)


class RowParallelBottleneck(Adapter):
    """A Parallel adapter beside a row-parallel layer, whose input x is split by features over the group: its down
    projection keeps the same input columns, the partial products are summed in the group, and the rest is the
    adapter's own: s · up(act(Σ_ranks down_shard x_shard))."""

    def __init__(self, adapter: Bottleneck, shard: Shard) -> None:
        super().__init__()
        start, size = shard.start, shard.size
        self.down = nn.Parameter(adapter.down.detach()[:, start : start + size].clone(), requires_grad=False)
        self.up = adapter.up
        self.act, self.dropout, self.scale = adapter.act, adapter.dropout, adapter.scale
        self.group = shard.group

    def trainable_names(self) -> tuple[str, ...]:
        return ("down", "up")

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.dropout(x.to(self.down.dtype)), self.down)  # (..., m): this rank's share of down(x)
        group_sum(z, self.group)
        return F.linear(self.act(z), self.up) * self.scale  # (..., d_out), whole: added after the layer's all-reduce


register(ParallelConfig, ParallelAdapter)
