"""Series (bottleneck) adapter: out = h + s · f(h), h the output of the wrapped sub-layer.

Houlsby et al. 2019 (arXiv 1902.00751, section 2.1) insert one after the attention output and one after
the MLP output ("houlsby"); Pfeiffer et al. 2021 (arXiv 2005.00247) keep only the one after the MLP
("pfeiffer", LLM-Adapters' final "Series" setting). The presets pick the default target modules per family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from adapters_ds.adapters.base import Adapter, Shard, option
from adapters_ds.adapters.bottleneck import Bottleneck, BottleneckConfig
from adapters_ds.adapters.registry import register
from adapters_ds.errors import InputError
from adapters_ds.families import LinearDims, Role


@dataclass
class SeriesConfig(BottleneckConfig):
    method: ClassVar[str] = "series"

    preset: Literal["pfeiffer", "houlsby"] = option(
        "pfeiffer",
        "Series placement: pfeiffer (after the MLP output) or houlsby (+ after attention)",
        flag="series_preset",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preset not in ("pfeiffer", "houlsby"):
            raise InputError(f"series preset must be 'pfeiffer' or 'houlsby', found {self.preset!r}")

    def roles(self) -> tuple[Role, ...]:
        return ("o", "mlp_down") if self.preset == "houlsby" else ("mlp_down",)


class SeriesAdapter(Bottleneck):
    tensor_parallel: ClassVar[str] = "applied after the sharded layer's all-reduce"

    def __init__(self, config: SeriesConfig, dims: LinearDims, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(config, dims.out_features, dims.out_features, dtype, device)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(out)

    def before_sharding(self, base: nn.Module) -> str:
        return "reattach"

    def shard(self, name: str, shard: Shard) -> Adapter:
        """On a row-parallel layer (the attention and MLP output projections, where it sits by default) h is whole
        again after the layer's all-reduce: the adapter stays as it is. A layer split by its outputs holds a slice of
        h only: refused."""
        return self if shard.split == "row" else super().shard(name, shard)


register(SeriesConfig, SeriesAdapter)
