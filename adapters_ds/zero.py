"""ZeRO-3 awareness in one place.

Under ZeRO-3 a base weight is a partition: its local `.shape` is `(0,)`, the true shape is `ds_shape`, and
its values exist only inside `deepspeed.zero.GatheredParameters`. Everything that reads a base weight's
shape or values goes through these helpers, so the same code runs with and without ZeRO-3.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter (it carries a `ds_id`)."""
    return hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's true shape, also when ZeRO-3 holds only a partition of it."""
    return param.ds_shape if is_partitioned(param) else param.shape


def full_numel(param: torch.Tensor) -> int:
    return param.ds_numel if is_partitioned(param) else param.numel()


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modify: bool = False) -> Iterator[None]:
    """Make the full values of `params` available inside the block.

    With `modify=True` rank 0's changes are broadcast and re-partitioned on exit (DeepSpeed's
    `modifier_rank=0`). A no-op for ordinary tensors, so callers need not know whether ZeRO-3 is on.
    """
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed  # only imported when ZeRO-3 parameters exist

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield
