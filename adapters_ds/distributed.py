"""Distributed start-up that works under every launcher a cluster user reaches for.

- `deepspeed` launcher and `torchrun`: RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT are set.
- `srun`: nothing of the above is set; map SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS, rendezvous at the
  first host of the job's node list on a port derived from the job id.
- `mpirun`: DeepSpeed discovers ranks through mpi4py.
- a plain `python script.py`: one rank on a free local port.
The backend comes from DeepSpeed's accelerator (NCCL on GPUs, gloo on CPU): never hard-coded.

`Ranks` is the project's one rank helper: this process's rank among the others and the collectives the project
uses (broadcast, gather, sum, barrier, "rank 0 does it, every rank learns the outcome"); with a single process
each of them is a no-op, so code written for several ranks runs unchanged in one. It also lays the ranks out for
tensor parallelism: groups of N consecutive ranks, each group one data-parallel unit.

The end is explicit too (`closing_distributed`, around every command's main): the ranks meet at a barrier, the
process groups are destroyed, and a command that is its process's program ends the process right there, with its
own exit code, instead of in the interpreter's finalization. Destroying the process groups does not stop their
communication threads: ZeRO parameters and DeepSpeed's group cache keep the groups alive, so gloo's threads still
run while finalization spends seconds freeing the modules' objects. A native thread that needs the interpreter
then is ended under it, and the C++ runtime aborts the process ("terminate called without an active exception",
exit code 134) after the adapter was saved; even without that, the ranks of a finished run lingered for seconds.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import groups as deepspeed_groups

from adapters_ds.errors import InputError

T = TypeVar("T")

EXIT_PREEMPTED = 75  # a training run's "checkpoint saved, continue later" (sysexits' EX_TEMPFAIL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]  # "node1" or a prefix of "node[1-4]" without scontrol


def map_launcher_env(env: dict[str, str] | None = None) -> None:
    """Fill the torch.distributed variables from SLURM (srun) or, for a lone process, with one-rank defaults."""
    env = os.environ if env is None else env
    if "RANK" in env or "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        return  # deepspeed / torchrun set them; under mpirun DeepSpeed asks mpi4py
    if "SLURM_STEP_NUM_TASKS" in env:  # inside an srun step (the batch script itself is no rank)
        env["RANK"] = env["SLURM_PROCID"]
        env["LOCAL_RANK"] = env["SLURM_LOCALID"]
        env["WORLD_SIZE"] = env.get("SLURM_NTASKS", env["SLURM_STEP_NUM_TASKS"])
        env.setdefault("MASTER_ADDR", _first_slurm_host(env.get("SLURM_STEP_NODELIST", env["SLURM_JOB_NODELIST"])))
        env.setdefault("MASTER_PORT", str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(_free_port()))


def init_distributed(timeout_s: float = 600.0) -> Ranks:
    """Start (or join) the process group; collectives time out instead of hanging on a dead rank. Returns this
    process's `Ranks`."""
    map_launcher_env()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend=get_accelerator().communication_backend_name(), timeout=timedelta(seconds=timeout_s)
        )
    info = Ranks(start=False)
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(info.local_rank)
        return info
    _unlink_shm_allreduce_buffer(info)
    if "OMP_NUM_THREADS" not in os.environ:
        # each CPU rank would otherwise start one thread per core: N ranks × N threads thrash the cores
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", info.world_size)))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_ranks))
    return info


def _unlink_shm_allreduce_buffer(info: Ranks) -> None:
    """Remove this rank's name of DeepSpeed's shared-memory all-reduce buffer once every rank has mapped it.

    Where all ranks share one host (LOCAL_SIZE, set by the `deepspeed` launcher, equals the world size), DeepSpeed
    creates a 69 MB buffer per rank in /dev/shm and never unlinks it: every such run, ended cleanly or killed,
    leaves its buffers in RAM until reboot. Once every rank has
    returned from start-up, each has mapped all its peers' buffers (DeepSpeed waits for them there); the mappings
    stay valid after the names go, and the memory is freed when the last rank exits.
    """
    info.barrier()
    # the name DeepSpeed gives it (deepspeed/ops/csrc/cpu/comm/shm.cpp)
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{info.rank}").unlink(missing_ok=True)


def launched_world_size(env: dict[str, str] | None = None) -> int:
    """World size announced by a launcher (torchrun / deepspeed, mpirun, an srun step); 1 for a plain process."""
    env = os.environ if env is None else env
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if env.get(key, "").isdigit():
            return int(env[key])
    if "SLURM_STEP_NUM_TASKS" in env:
        return int(env.get("SLURM_NTASKS", env["SLURM_STEP_NUM_TASKS"]))
    return 1


def launched_rank(env: dict[str, str] | None = None) -> int:
    """This process's rank as announced by its launcher (as `launched_world_size`), before any process group
    exists; 0 for a plain process."""
    env = os.environ if env is None else env
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if env.get(key, "").isdigit():
            return int(env[key])
    if "SLURM_STEP_NUM_TASKS" in env:
        return int(env["SLURM_PROCID"])
    return 0


class Ranks:
    """This process's place among the ranks, with the collectives the project uses.

    With `start=True` a process group is started (`init_distributed`) only when a launcher runs several ranks
    and none exists yet: a plain `python script.py` (and a test calling a command in-process) runs without one.
    With `start=False` it only describes the process group that exists, if any. Without a process group of more
    than one rank, `rank` is 0, `world_size` 1 and every collective returns its own input. Collectives must be
    called by every rank, in the same order.

    Tensor parallelism (`tensor_parallel=N`): the ranks form groups of N consecutive ranks, [0, N), [N, 2N), ...
    (consecutive, so that a group stays on one node where N divides the ranks per node: launchers number a node's
    ranks consecutively). The ranks of a group hold one model sharded between them and do the same work, so the
    group is the unit of data parallelism: `dp_rank` is this rank's group and `dp_size` the number of groups,
    `tp_rank` its place in the group and `tp_group` the group's process group (None for N = 1). With N = 1 every
    rank is a group of its own (dp_rank = rank, dp_size = world_size). A world that N does not divide is an
    InputError on every rank. Constructing it with N > 1 creates the groups: every rank must do it, at the same point.
    """

    def __init__(self, start: bool = True, tensor_parallel: int = 1) -> None:
        dist = torch.distributed
        if start and dist.is_available() and not dist.is_initialized() and launched_world_size() > 1:
            init_distributed()
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.active else 0
        self.world_size = dist.get_world_size() if self.active else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0)) if self.active else 0  # the device index on its node
        size = tensor_parallel
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise InputError(f"tensor_parallel: expected a positive integer; found {size!r}")
        if self.world_size % size:
            raise InputError(
                f"tensor_parallel {size}: expected a divisor of the number of ranks, {self.world_size}; launch a "
                f"multiple of {size} ranks (groups of {size} ranks each hold one copy of the model)"
            )
        self.tensor_parallel = size
        self.dp_size = self.world_size // size
        self.dp_rank, self.tp_rank = divmod(self.rank, size)
        self.tp_group: Any = None
        if size > 1:  # new_group is collective: every rank creates every group, in the same order
            groups = [dist.new_group(list(range(first, first + size))) for first in range(0, self.world_size, size)]
            self.tp_group = groups[self.dp_rank]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tp_leader(self) -> int:
        """The (global) rank of this rank's tensor-parallel group that speaks for it: its first."""
        return self.dp_rank * self.tensor_parallel

    @property
    def is_tp_leader(self) -> bool:
        return self.tp_rank == 0

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` (any picklable object) on every rank."""
        if not self.active:
            return obj
        holder = [obj]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj` (any picklable object), in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def sum(self, tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
        """`tensor` summed over the ranks (of `group`, a process group such as `tp_group`; default all), in place (on
        the device the process group communicates on); returned."""
        return group_sum(tensor, group) if self.active else tensor

    def barrier(self) -> None:
        """Wait until every rank has reached this call."""
        if self.active:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first, the others after it (to reuse what it made: downloads, caches)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only; its result, or its InputError, on every rank (so no rank waits forever)."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except InputError as exc:
                error = str(exc)
        result, error = self.broadcast((result, error))
        if error is not None:
            raise InputError(error)
        return result


def group_sum(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """`tensor` summed in place over the ranks of `group` (default: all), returned; the identity without a process
    group. Every rank of the group must call it. Method code sums through this (or `Ranks.sum`), never through
    `torch.distributed` itself."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def broadcast_tensor(tensor: torch.Tensor, src: int = 0, group: Any = None) -> torch.Tensor:
    """Rank `src`'s `tensor` (`src` a global rank) on every rank of `group` (default: all), in place, returned; the
    identity without a process group. Every rank of the group must call it."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(tensor, src, group=group)
    return tensor


# ------------------------------------------------------------------------------------------------------ the end


def shutdown(wait: bool = True) -> None:
    """End this process's distributed state: with `wait`, a barrier first (no rank leaves while another still needs
    it: a peer that has died already only makes the barrier fail, which is ignored), then every process group is
    destroyed and DeepSpeed's cached groups are forgotten, so a later `init_distributed` in this process starts
    afresh. A no-op without a process group."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait:
        with contextlib.suppress(RuntimeError):  # DistBackendError and the timeout errors derive from it
            dist.barrier()
    dist.destroy_process_group()
    _forget_deepspeed_groups()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches the groups it creates in module globals (the world group it clones for ZeRO, above all):
    left there, the next engine of this process would communicate on a destroyed group."""
    pg_type = torch.distributed.ProcessGroup
    for name, value in vars(deepspeed_groups).items():
        if isinstance(value, pg_type):
            setattr(deepspeed_groups, name, None)
        elif isinstance(value, dict) and any(isinstance(v, pg_type) for v in value.values()):
            value.clear()


def _exit_code(error: BaseException | None) -> int:
    """The exit code Python would give for `error` (None: success)."""
    if error is None:
        return 0
    if isinstance(error, SystemExit):
        return error.code or 0 if error.code is None or isinstance(error.code, int) else 1  # sys.exit("message"): 1
    if isinstance(error, KeyboardInterrupt):
        return 130
    return 1


@contextlib.contextmanager
def closing_distributed(exit_process: bool = False) -> Iterator[None]:
    """Around a command's main: end the distributed state the command started, however the command ends.

    - Success, and exit code 75 (a checkpoint before preemption: every rank leaves at the same step): every rank
      waits for the others at a barrier, then the process groups are destroyed (`shutdown`).
    - Other exits (`error: ...` with exit code 2, or a crash): no barrier, since the other ranks may never get
      there; the process groups are destroyed all the same.
    - A process group that existed before the command (a caller running commands in its own process) is left as
      it is.

    With `exit_process` (the command is its process's program: `main()` reading `sys.argv`) and a process group
    to end, the process then ends at once with the command's exit code, as Python's multiprocessing ends its
    children: `atexit` handlers run (logging and other writers flush), the standard streams are flushed, an
    uncaught exception's traceback is printed as Python would print it, and `os._exit` skips the interpreter's
    finalization, where the abort described in this module's docstring happens and which also kept the ranks of a
    finished run alive for seconds.
    """
    dist = torch.distributed
    started_here = not (dist.is_available() and dist.is_initialized())
    error: BaseException | None = None
    try:
        yield
    except BaseException as exc:  # re-raised below unless the process ends here with the code it implies
        error = exc
    running = dist.is_available() and dist.is_initialized()
    code = _exit_code(error)
    if running and (started_here or exit_process):
        shutdown(wait=code in (0, EXIT_PREEMPTED))
        if exit_process:
            if isinstance(error, SystemExit) and not (error.code is None or isinstance(error.code, int)):
                print(error.code, file=sys.stderr)  # as Python prints sys.exit("message")
            elif error is not None and not isinstance(error, SystemExit):
                traceback.print_exception(error)
            _end_process(code)
    if error is not None:
        raise error


def _end_process(code: int) -> None:
    atexit._run_exitfuncs()  # what a normal exit runs first: logging.shutdown, progress bars, writers
    mpi = sys.modules.get("mpi4py.MPI")  # under mpirun DeepSpeed found the ranks through mpi4py
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()  # mpi4py finalizes in the interpreter's finalization, skipped here; mpirun fails a rank without
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe must not change the exit code
            stream.flush()
    os._exit(code)
