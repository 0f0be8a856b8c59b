"""Distributed start-up that works under every launcher a cluster user reaches for.

- `deepspeed` launcher and `torchrun`: RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT are set.
- `srun`: nothing of the above is set; map SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS, rendezvous at the
  first host of the job's node list on a port derived from the job id.
- `mpirun`: DeepSpeed discovers ranks through mpi4py.
- a plain `python script.py`: one rank on a free local port.
The backend comes from DeepSpeed's accelerator (NCCL on GPUs, gloo on CPU): never hard-coded.

`Ranks` is the project's one rank helper: this process's rank among the others and the collectives the project
uses (broadcast, gather, sum, barrier, "rank 0 does it, every rank learns the outcome"); with a single process
each of them is a no-op, so code written for several ranks runs unchanged in one.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from adapters_ds.errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Start (or join) the process group; collectives time out instead of hanging on a dead rank."""
    map_launcher_env()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend=get_accelerator().communication_backend_name(), timeout=timedelta(seconds=timeout_s)
        )
    info = DistInfo(
        rank=torch.distributed.get_rank(),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=torch.distributed.get_world_size(),
    )
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(info.local_rank)
        return info
    _unlink_shm_allreduce_buffer(info)
    if "OMP_NUM_THREADS" not in os.environ:
        # each CPU rank would otherwise start one thread per core: N ranks × N threads thrash the cores
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", info.world_size)))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_ranks))
    return info


def _unlink_shm_allreduce_buffer(info: DistInfo) -> None:
    """Remove this rank's name of DeepSpeed's shared-memory all-reduce buffer once every rank has mapped it.

    Where all ranks share one host (LOCAL_SIZE, set by the `deepspeed` launcher, equals the world size), DeepSpeed
    creates a 69 MB buffer per rank in /dev/shm and never unlinks it: every such run, ended cleanly or killed,
    leaves its buffers in RAM until reboot. Once every rank has
    returned from start-up, each has mapped all its peers' buffers (DeepSpeed waits for them there); the mappings
    stay valid after the names go, and the memory is freed when the last rank exits.
    """
    barrier()
    # the name DeepSpeed gives it (deepspeed/ops/csrc/cpu/comm/shm.cpp)
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{info.rank}").unlink(missing_ok=True)


def is_main_process() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def launched_world_size(env: dict[str, str] | None = None) -> int:
    """World size announced by a launcher (torchrun / deepspeed, mpirun, an srun step); 1 for a plain process."""
    env = os.environ if env is None else env
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if env.get(key, "").isdigit():
            return int(env[key])
    if "SLURM_STEP_NUM_TASKS" in env:
        return int(env.get("SLURM_NTASKS", env["SLURM_STEP_NUM_TASKS"]))
    return 1


class Ranks:
    """This process's place among the ranks, with the collectives the project uses.

    With `start=True` a process group is started (`init_distributed`) only when a launcher runs several ranks
    and none exists yet: a plain `python script.py` (and a test calling a command in-process) runs without one.
    With `start=False` it only describes the process group that exists, if any. Without a process group of more
    than one rank, `rank` is 0, `world_size` 1 and every collective returns its own input. Collectives must be
    called by every rank, in the same order.
    """

    def __init__(self, start: bool = True) -> None:
        dist = torch.distributed
        if start and dist.is_available() and not dist.is_initialized() and launched_world_size() > 1:
            init_distributed()
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.active else 0
        self.world_size = dist.get_world_size() if self.active else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the ranks, in place (on the device the process group communicates on); returned."""
        if self.active:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        """Wait until every rank has reached this call."""
        if self.active:
            torch.distributed.barrier()

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
