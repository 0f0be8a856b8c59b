"""Counting the places where the host would wait for the device, by source file: on a CPU as well (a structural
check), from the operations that synchronise on CUDA, and on CUDA from torch's own sync debug mode.

`HostReads` (any device) counts operations whose result the host needs before it can go on: a value read back
(`.item()`, `float(t)`, `bool(t)`, `.tolist()`) and outputs whose size depends on the data (`nonzero`, boolean-mask
indexing, `masked_select`, `repeat_interleave` without an output size, `unique`). `CudaSyncs` counts the warnings of
`torch.cuda.set_sync_debug_mode("warn")` (every synchronising CUDA call, plain host-to-device copies included).
Both attribute each one to the innermost frame in adapters_ds or transformers (e.g. "training/loss.py",
"transformers/masking_utils.py"), and `paused` leaves out what a block does (DeepSpeed's backward and step).
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}
READS |= {aten.repeat_interleave.Tensor, aten._unique2.default, aten.unique_consecutive.default}
INDEX = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


def source(frames: list[traceback.FrameSummary]) -> str:
    """The innermost frame in adapters_ds or transformers, as "package-relative path" (else the innermost frame)."""
    for frame in reversed(frames):
        path = frame.filename.replace("\\", "/")
        for root in ("/adapters_ds/", "/transformers/"):
            if root in path and "/tests/" not in path:
                rel = path.rsplit(root, 1)[1]
                return rel if root == "/adapters_ds/" else f"transformers/{rel}"
    return frames[-1].filename if frames else "?"


def _boolean_index(func: Any, args: tuple) -> bool:
    if func not in INDEX or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ())


class Counts:
    def __init__(self, on_pause: Callable[[bool], None] = lambda paused: None) -> None:
        self.by_source: Counter[str] = Counter()
        self.paused, self.on_pause = 0, on_pause

    def add(self) -> None:
        if not self.paused:
            self.by_source[source(traceback.extract_stack())] += 1

    def pause(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` with counting paused while it runs."""

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.paused += 1
            self.on_pause(True)
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused -= 1
                self.on_pause(self.paused > 0)

        return wrapped


class _Mode(TorchDispatchMode):
    def __init__(self, counts: Counts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS or _boolean_index(func, args):
            self.counts.add()
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads() -> Iterator[Counts]:
    """Count `HostReads` (see the module docstring) in the block."""
    counts = Counts()
    tolist = torch.Tensor.tolist

    def counted_tolist(self: torch.Tensor) -> Any:
        counts.add()
        return tolist(self)

    torch.Tensor.tolist = counted_tolist  # .tolist() of a CPU tensor bypasses the dispatcher
    try:
        with _Mode(counts):
            yield counts
    finally:
        torch.Tensor.tolist = tolist


@contextlib.contextmanager
def cuda_syncs() -> Iterator[Counts]:
    """Count synchronising CUDA calls in the block (torch's sync debug mode: a warning each, counted as it is
    issued, with the Python stack of the call)."""
    counts = Counts(on_pause=lambda paused: torch.cuda.set_sync_debug_mode(0 if paused else "warn"))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                counts.add()
            else:
                original(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counts
        finally:
            torch.cuda.set_sync_debug_mode(0)
