"""Stopping a run early and cleanly: SLURM's warning before the time limit and preemption become a checkpoint at
the next step boundary and exit code 75, on which the SLURM launch script requeues the job."""

from __future__ import annotations

import signal

from adapters_ds.distributed import EXIT_PREEMPTED

__all__ = ["EXIT_PREEMPTED", "StopSignal"]


class StopSignal:
    """Records SIGUSR1 (SLURM's warning before the time limit) and SIGTERM (preemption, scancel); the loop
    checkpoints at the next step boundary and exits, and the requeued job resumes with `--resume auto`."""

    def __init__(self) -> None:
        self.received: str | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name
