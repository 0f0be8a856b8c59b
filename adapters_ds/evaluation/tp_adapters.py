"""Adapters on a tensor-parallel model: each method merged, folded or applied so that the sharded model computes what
the adapted model computes in one process (`evaluation.tensor_parallel` shards it).

AutoTP replaces each linear layer of a block by a new module holding this rank's shard, so an adapter attached to the
old layer (a child module and forward hooks) would silently be lost. Before sharding, every adapter is therefore
merged into the base weights or taken off (`prepare_adapters`), and the ones taken off are put back on the sharded
layer in the form its split needs (`reattach`):

- LoRA (with DoRA, rsLoRA): merged into the base weights, as the one-process evaluation does by default.
- Stochastic gates: folded into the base weights. In evaluation mode a gate is a fixed scale of one output row or
  one input column, so z_r ⊙ (W (z_c ⊙ x) + s·BA (z_c ⊙ x) + b) = W' x + b' with W' = diag(z_r) (W + s·BA) diag(z_c),
  b' = z_r ⊙ b (computed in fp32, cast back).
- Series, f(h) added to a layer's output h: on a row-parallel layer (the attention and MLP output projections, where
  it sits by default) h is whole again after the layer's all-reduce, so the adapter is put back unchanged. A layer
  split by its outputs holds a slice of h only: refused.
- Parallel, f(x) added to a layer's output: beside a column-parallel layer (the MLP up projection) the input is
  whole and the output a slice, so the adapter's up projection keeps the same rows as the layer; beside a
  row-parallel layer (the down projection) the input is split by features, so its down projection is split alike
  and the partial products are summed in the group (one all-reduce of the bottleneck width) before the rest of it.
- Prompt tuning and P-tuning act on the input embeddings, which are not sharded: they stay as they are.

Any other method (prefix tuning: per-head keys and values; plugins) is refused before the model loads (`TP_METHODS`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, SubParamColumnParallel
from torch import nn

from adapters_ds.adapters.base import Adapter, adapter_layers, attach, detach
from adapters_ds.adapters.bottleneck import Bottleneck
from adapters_ds.adapters.gates import Gates
from adapters_ds.adapters.parallel import ParallelAdapter
from adapters_ds.adapters.series import SeriesAdapter
from adapters_ds.errors import InputError
from adapters_ds.zero import gathered

# How each adapter method is evaluated with tensor parallelism (see the module docstring); others are refused.
TP_METHODS: dict[str, str] = {
    "lora": "merged into the base weights before sharding",
    "gates": "folded into the base weights before sharding",
    "series": "applied after the sharded layer's all-reduce",
    "parallel": "applied per shard",
    "prompt": "unchanged (the input embeddings are not sharded)",
    "ptuning": "unchanged (the input embeddings are not sharded)",
}


def check_method(method: str) -> None:
    if method not in TP_METHODS:
        raise InputError(
            f"adapter method {method!r} cannot be evaluated with tensor parallelism (supported: "
            f"{', '.join(TP_METHODS)}); evaluate it with --tensor_parallel 1"
        )


@torch.no_grad()
def fold_gates(base: nn.Module, gates: Gates) -> None:
    """Fold evaluation-mode gates (and the LoRA inside them) into `base`'s weight and bias; also on ZeRO-3
    partitions (every rank calls it, rank 0's result is kept)."""
    rows, cols = gates.eval_gates()  # (out,), (in,) fp32
    params = [base.weight] if base.bias is None else [base.weight, base.bias]
    with gathered(params, modify=True):
        weight = base.weight.T if gates.transposed else base.weight  # (out, in) view: writes reach the weight
        math = torch.promote_types(weight.dtype, torch.float32)  # fp32, or the weights' own wider dtype
        rows, cols = rows.to(weight.device, math), cols.to(weight.device, math)
        folded = weight.to(math)
        if gates.lora_r:  # s · B A, (out, in), as precise as the forward computes it
            folded += gates.scaling * (gates.lora_B.to(weight.device, math) @ gates.lora_A.to(weight.device, math))
        weight.copy_((rows[:, None] * folded * cols[None, :]).to(weight.dtype))
        if base.bias is not None:
            base.bias.copy_((rows * base.bias.to(math)).to(base.bias.dtype))


def prepare_adapters(model: nn.Module) -> list[tuple[str, Adapter]]:
    """Before sharding: merge or fold each layer adapter into its base weights, or take it off to be put back on the
    sharded layer (`reattach`); returns the ones taken off with their module paths. Model-level adapters stay."""
    detached = []
    for name, base, adapter in list(adapter_layers(model)):
        if name == "":  # prompt tuning, P-tuning: hooks on the model's inputs, which sharding does not touch
            continue
        if adapter.mergeable:
            adapter.merge(base)
            detach(base)
        elif isinstance(adapter, Gates):
            fold_gates(base, adapter)
            detach(base)
        elif isinstance(adapter, Bottleneck):
            detached.append((name, detach(base)))
        else:
            raise InputError(f"adapter at {name!r} ({type(adapter).__name__}) cannot be evaluated sharded")
    return detached


class RowParallelBottleneck(Adapter):
    """A Parallel adapter beside a row-parallel layer, whose input x is split by features over the group: its down
    projection keeps the same input columns, the partial products are summed in the group, and the rest is the
    adapter's own: s · up(act(Σ_ranks down_shard x_shard))."""

    def __init__(self, adapter: Bottleneck, start: int, size: int, group: object) -> None:
        super().__init__()
        self.down = nn.Parameter(adapter.down.detach()[:, start : start + size].clone(), requires_grad=False)
        self.up = adapter.up
        self.act, self.dropout, self.scale = adapter.act, adapter.dropout, adapter.scale
        self.group = group

    def trainable_names(self) -> tuple[str, ...]:
        return ("down", "up")

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        z = F.linear(self.dropout(x.to(self.down.dtype)), self.down)  # (..., m): this rank's share of down(x)
        torch.distributed.all_reduce(z, group=self.group)
        return F.linear(self.act(z), self.up) * self.scale  # (..., d_out), whole: added after the layer's all-reduce


def _split(layer: nn.Module) -> str:
    """How AutoTP split `layer`: "row" (input features; whole output after its all-reduce), "column" (output
    features, one contiguous slice per rank), "fused" (a fused projection, slices per sub-matrix) or "whole"."""
    if isinstance(layer, LinearAllreduce):
        return "row"
    if isinstance(layer, SubParamColumnParallel):
        return "fused"
    return "column" if isinstance(layer, LinearLayer) else "whole"


def _shard(layer: nn.Module) -> tuple[int, int]:
    """(first index, size) of this rank's slice of the split dimension of a sharded layer."""
    sizes = layer._partition_sizes  # AutoTP's split of this layer, fixed when it was built
    return sum(sizes[: layer.tp_index]), sizes[layer.tp_index]


def shard_adapter(name: str, layer: nn.Module, adapter: Adapter, group: object) -> Adapter:
    """`adapter`, taken off the layer at `name` before sharding, in the form the sharded `layer` needs."""
    split = _split(layer)
    if split == "whole":
        return adapter
    if isinstance(adapter, SeriesAdapter) and split == "row":
        return adapter
    if isinstance(adapter, ParallelAdapter) and split == "column":
        start, size = _shard(layer)
        adapter.up = nn.Parameter(adapter.up.detach()[start : start + size].clone(), requires_grad=False)
        return adapter
    if isinstance(adapter, ParallelAdapter) and split == "row":
        start, size = _shard(layer)
        return RowParallelBottleneck(adapter, start, size, group)
    raise InputError(
        f"{type(adapter).__name__} at {name!r}: tensor parallelism splits that layer by its "
        f"{'output' if split != 'row' else 'input'} features, which this adapter needs whole; evaluate it with "
        "--tensor_parallel 1"
    )


def reattach(model: nn.Module, detached: list[tuple[str, Adapter]], group: object) -> None:
    """Put the adapters `prepare_adapters` took off back on the (now sharded) layers at their paths."""
    modules = dict(model.named_modules())
    for name, adapter in detached:
        layer = modules[name]
        attach(layer, shard_adapter(name, layer, adapter, group))
