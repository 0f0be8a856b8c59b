"""Adapters on a tensor-parallel model: each adapter merged, folded or applied so that the sharded model computes what
the adapted model computes in one process (`evaluation.tensor_parallel` shards it).

AutoTP replaces each linear layer of a block by a new module holding this rank's shard, so an adapter attached to the
old layer (a child module and forward hooks) would silently be lost. Before sharding, every adapter is therefore
asked what to do (`Adapter.before_sharding`): merged or folded into the base weights (LoRA, stochastic gates), taken
off to be put back on the sharded layer in the form its split needs (`Adapter.shard`: Series, Parallel), or left
where it is (prompt tuning and P-tuning act on the input embeddings, which are not sharded). How each method behaves
is the method's own (`Adapter.tensor_parallel`, its docstring); a method without it is refused before the model loads
(`check_method`). Nothing here names a method.
"""

from __future__ import annotations

from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, SubParamColumnParallel
from torch import nn

from adapters_ds.adapters.base import Adapter, Shard, adapter_layers, attach, detach
from adapters_ds.adapters.registry import METHODS, get_method
from adapters_ds.errors import InputError


def check_method(method: str) -> None:
    """Refuse (InputError) a method that cannot be evaluated with tensor parallelism."""
    if get_method(method).layer.tensor_parallel is None:
        supported = [name for name, m in sorted(METHODS.items()) if m.layer.tensor_parallel is not None]
        raise InputError(
            f"adapter method {method!r} cannot be evaluated with tensor parallelism (supported: "
            f"{', '.join(supported)}); evaluate it with --tensor_parallel 1"
        )


def prepare_adapters(model: nn.Module) -> list[tuple[str, Adapter]]:
    """Before sharding: merge or fold each adapter into its base weights, or take it off to be put back on the sharded
    layer (`reattach`), or leave it (`Adapter.before_sharding`); returns the ones taken off with their module paths.
    Every rank calls it (folding may gather ZeRO-3 partitions)."""
    detached = []
    for name, base, adapter in list(adapter_layers(model)):
        if adapter.tensor_parallel is None:
            raise InputError(f"adapter at {name!r} ({type(adapter).__name__}) cannot be evaluated sharded")
        action = adapter.before_sharding(base)
        if action == "folded":
            detach(base)
        elif action == "reattach":
            detached.append((name, detach(base)))
        elif action != "stays":
            raise TypeError(f"{type(adapter).__name__}.before_sharding returned {action!r}")
    return detached


def _split(layer: nn.Module) -> str:
    """How AutoTP split `layer`: "row" (input features; whole output after its all-reduce), "column" (output
    features, one contiguous slice per rank), "fused" (a fused projection, slices per sub-matrix) or "whole"."""
    if isinstance(layer, LinearAllreduce):
        return "row"
    if isinstance(layer, SubParamColumnParallel):
        return "fused"
    return "column" if isinstance(layer, LinearLayer) else "whole"


def shard_of(layer: nn.Module, group: object) -> Shard:
    """The split of a (sharded) layer and this rank's slice of the split dimension."""
    split = _split(layer)
    if split in ("whole", "fused"):
        return Shard(split, 0, 0, group)
    sizes = layer._partition_sizes  # AutoTP's split of this layer, fixed when it was built
    return Shard(split, sum(sizes[: layer.tp_index]), sizes[layer.tp_index], group)


def reattach(model: nn.Module, detached: list[tuple[str, Adapter]], group: object) -> None:
    """Put the adapters `prepare_adapters` took off back on the (now sharded) layers at their paths."""
    modules = dict(model.named_modules())
    for name, adapter in detached:
        layer = modules[name]
        attach(layer, adapter.shard(name, shard_of(layer, group)))
