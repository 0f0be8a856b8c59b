"""ZeRO-3 awareness in one place.

Under ZeRO-3 a base weight is a partition: its local `.shape` is `(0,)`, the true shape is `ds_shape`, and
its values exist only inside `deepspeed.zero.GatheredParameters`. Everything that reads a base weight's
shape or values goes through these helpers, so the same code runs with and without ZeRO-3.

Persistence: ZeRO-3 keeps a "persistent" parameter whole on every rank instead of gathering it for each use.
DeepSpeed decides it once, in `deepspeed.initialize`, from `stage3_param_persistence_threshold` (numel <= threshold),
and keeps the result as one list that its optimizer re-gathers after every step and checkpoint load. A threshold
cannot tell a large adapter tensor from a small frozen matrix (grouped-query k/v projections are often smaller than
a bottleneck adapter), so `persist_exactly` rewrites that list right after `initialize`: exactly the parameters
chosen stay whole, every other one is partitioned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import deepspeed
import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter (it carries a `ds_id`)."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's true shape, also when ZeRO-3 holds only a partition of it."""
    return param.ds_shape if is_partitioned(param) else param.shape


def full_numel(param: torch.Tensor) -> int:
    return param.ds_numel if is_partitioned(param) else param.numel()


def is_resident(param: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter that is persistent and whole on this rank now."""
    return getattr(param, "ds_persist", False) and param.ds_status == ZeroParamStatus.AVAILABLE


def persistent_list(engine) -> list | None:
    """The list of persistent parameters a ZeRO-3 engine re-gathers after each step (None without ZeRO-3, or where
    this DeepSpeed version keeps it elsewhere: then only the threshold decides)."""
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)
    found = getattr(offload, "persistent_parameters", None)
    if not isinstance(found, list) or getattr(optimizer, "persistent_parameters", found) is not found:
        return None
    return found


def persist_exactly(engine, keep: Iterable[torch.nn.Parameter]) -> None:
    """Make exactly `keep` the persistent parameters of a ZeRO-3 engine; call right after `deepspeed.initialize`,
    before the first forward (the first forward records which parameters to release after use).

    Parameters the threshold made persistent but `keep` does not hold are partitioned again; those of `keep` are
    gathered now. The optimizer's fp32 master copy and its state stay partitioned as before, and gradients are
    reduce-scattered as usual: persistence only decides where the working copy lives.
    """
    persistent = persistent_list(engine)
    if persistent is None:
        raise RuntimeError("this DeepSpeed version keeps no persistent-parameter list on the ZeRO-3 engine")
    keep = list(keep)
    keep_ids = {id(p) for p in keep}
    dropped = [p for p in engine.module.parameters() if getattr(p, "ds_persist", False) and id(p) not in keep_ids]
    for param in dropped:
        param.ds_persist = False
    release = [p for p in dropped if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_active_sub_modules]
    if release:
        release[0].partition(release)
    persistent[:] = [p for p in persistent if id(p) in keep_ids]  # in place: the optimizer holds this list
    listed = {id(p) for p in persistent}
    for param in keep:
        param.ds_persist = True
        if id(param) not in listed:
            persistent.append(param)
    missing = [p for p in persistent if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if missing:
        missing[0].all_gather(missing)


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modify: bool = False) -> Iterator[None]:
    """Make the full values of `params` available inside the block.

    With `modify=True` rank 0's changes are broadcast and re-partitioned on exit (DeepSpeed's
    `modifier_rank=0`). A no-op for ordinary tensors, so callers need not know whether ZeRO-3 is on.
    """
    # to read, a persistent parameter that is whole already needs no gather (nor a partition on exit); a change
    # must go through the gather, which writes it back to the partitions the optimizer steps
    partitioned = [p for p in params if is_partitioned(p) and (modify or not is_resident(p))]
    if not partitioned:
        yield
        return
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield
