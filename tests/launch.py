"""Running the real training command under real launchers (deepspeed, torchrun, mpirun, plain python)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "launcher" / "train.py")
EXTENSIONS = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "adapters_ds" / "torch_extensions"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": str(EXTENSIONS),  # DeepSpeed's JIT-built ops are compiled once, then reused
        "OMP_NUM_THREADS": "1",  # two ranks share two cores
        "TOKENIZERS_PARALLELISM": "false",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
    }


def command(launcher: str, nproc: int, script: str = TRAIN) -> list[str]:
    port = str(free_port())
    if launcher == "deepspeed":
        runner = Path(sys.executable).parent / "deepspeed"
        return [str(runner), "--num_gpus", str(nproc), "--master_port", port, script]
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            port,
            script,
        ]
    if launcher == "mpirun":
        mpi = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(nproc)]
        return [
            *mpi,
            "-x",
            "MASTER_ADDR=127.0.0.1",
            "-x",
            f"MASTER_PORT={port}",
            "-x",
            "OMP_NUM_THREADS=1",
            sys.executable,
            script,
        ]
    assert launcher == "python" and nproc == 1
    return [sys.executable, script]


def run(args: list[str], launcher: str = "deepspeed", nproc: int = 2, timeout: int = 1200, check: bool = True):
    result = subprocess.run(
        [*command(launcher, nproc), *args], env=env(), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def losses(run_dir: Path) -> list[float]:
    lines = (Path(run_dir) / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def has_mpirun() -> bool:
    if shutil.which("mpirun") is None:
        return False
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True
