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


def run(
    args: list[str],
    launcher: str = "deepspeed",
    nproc: int = 2,
    timeout: int = 1200,
    check: bool = True,
    env_extra: dict[str, str] | None = None,
):
    result = subprocess.run(
        [*command(launcher, nproc), *args],
        env={**env(), **(env_extra or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        )
    return result


def start_ranks(args: list[str], log_dir: Path, nproc: int = 2, script: str = TRAIN) -> list[subprocess.Popen]:
    """Each rank a plain process with the torch.distributed variables set, as srun's mapping sets them: no launcher
    watches over them, so what a rank does when another one dies is its own doing. Output goes to
    `log_dir/rank<N>.log`."""
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        variables = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc)}
        variables.update(LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        with (Path(log_dir) / f"rank{rank}.log").open("w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, script, *args], env={**env(), **variables}, cwd=REPO, stdout=log, stderr=log
                )
            )
    return procs


def write_train_assets(root: Path) -> Path:
    """A tiny LLaMA with its tokenizer (`base/`), a learnable toy task (`data.json`, 96 records) and fp32 variants
    of the shipped configs (`zero3_fp32.json`, `zero2_fp32.json`, `nozero_fp32.json`) under `root`."""
    import random

    from tiny_models import make_model
    from tiny_tokenizer import make_tokenizer

    root = Path(root)
    make_model("llama").save_pretrained(root / "base")
    make_tokenizer().save_pretrained(root / "base")
    rng = random.Random(0)
    records = []
    for _ in range(96):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        records.append({"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} + {b} = {a + b}."})
    (root / "data.json").write_text(json.dumps(records))
    for name in ("zero3", "zero2"):
        config = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
        config["bf16"] = {"enabled": False}
        (root / f"{name}_fp32.json").write_text(json.dumps(config))
    no_zero = {**json.loads((root / "zero2_fp32.json").read_text()), "zero_optimization": {"stage": 0}}
    (root / "nozero_fp32.json").write_text(json.dumps(no_zero))
    return root


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
