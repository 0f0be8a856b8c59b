"""Dropout on an adapter's input: one cheap mask per input tensor, shared by the adapters that read that tensor.

LoRA drops out the input of its low-rank branch, and in a transformer block several adapted layers read the very
same tensor (q, k and v the attention's normed input; gate and up the MLP's). torch's `dropout` draws one Bernoulli
variate per element and per call, which on a CPU costs far more than the low-rank products it feeds. Here:

- the mask comes from 16 random bits per element (one 64-bit draw of the device's generator gives four), kept
  where the bits fall below round((1 - p) · 2¹⁶): each element is kept independently with probability
  q = round((1 - p) · 2¹⁶) / 2¹⁶, which differs from 1 - p by at most 2⁻¹⁷;
- the caller scales by 1/q, so E[dropped input] = input exactly, as with torch's dropout (`SharedDropout` returns
  the scale separately: LoRA folds it into its output scale, which saves a pass over the input);
- the adapters that read one tensor (the same storage, offset, shape, strides and version; ZeRO-3 hands each module
  a detached alias of it) get the same dropped tensor, computed once. Each adapter still sees dropout of rate p
  with the same expectation; only the masks of the adapters sharing an input are no longer independent.

The draws come from the device's default generator in a fixed order, so a recomputed forward (activation
checkpointing restores the generator's state) gets the same masks as the first.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

LEVELS = 1 << 16  # the mask's resolution: 16 random bits per element


def keep_threshold(p: float) -> int:
    """Elements whose 16 random bits (as an unsigned number) are below this many are kept: round((1 - p) · 2¹⁶)."""
    return round((1.0 - p) * LEVELS)


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool mask of `shape`, each element True independently with probability keep_threshold(p) / 2¹⁶."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)  # all 64 bits random
    bits = words.view(torch.int16)[:n].view(shape)  # uniform on [-2¹⁵, 2¹⁵)
    return bits < keep_threshold(p) - LEVELS // 2


class _Entry(NamedTuple):
    source: torch.Tensor  # the input first seen, held so that no other tensor can get its storage while cached
    key: tuple  # where and what the input is
    p: float
    dropped: torch.Tensor  # input · mask
    scale: float


def _key(x: torch.Tensor) -> tuple:
    storage = x.untyped_storage().data_ptr()
    return (storage, x.storage_offset(), x.shape, x.stride(), x.dtype, x.device, x._version, torch.is_grad_enabled())


class SharedDropout(nn.Module):
    """Dropout of rate `p` whose forward returns (input · mask, 1/q): the caller multiplies by the scale (see the
    module docstring). In eval mode, or with p = 0, the input itself and 1.0.

    One mask per input tensor across all instances: a process-wide one-entry cache (the adapters reading one tensor
    call it back to back) that holds the last input and its dropped copy until the next call. It holds them
    strongly, so whether a call reuses the mask depends only on the inputs, never on which tensors autograd keeps
    alive: a forward recomputed under activation checkpointing (which keeps fewer) reuses exactly as the first."""

    _last: _Entry | None = None

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"dropout probability must be in [0, 1], found {p}")
        self.p = p

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        if not self.training or self.p == 0:
            return x, 1.0
        key, last = _key(x), SharedDropout._last
        if last is not None and last.p == self.p and last.key == key:
            return last.dropped, last.scale
        kept = keep_threshold(self.p)
        # (..., in), the dropped elements 0; a mask in x's dtype: a bool operand takes a slow type-promoting path
        dropped = x * keep_mask(x.shape, self.p, x.device).to(x.dtype)
        scale = LEVELS / kept if kept else 0.0
        SharedDropout._last = _Entry(x, key, self.p, dropped, scale)
        return dropped, scale
