"""Engine checkpoints for exact resume: `output_dir/checkpoints/step-N/`.

Each holds DeepSpeed's engine state with the frozen base excluded (adapter weights, optimizer, scheduler),
each rank's RNG state, the adapter files, and last a `complete.json` marker written after every rank has
finished: a folder without it (a run killed while saving) is never resumed from, and never counted as kept.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from deepspeed.accelerator import get_accelerator
from safetensors.torch import load_file, save_file

from adapters_ds.distributed import DistInfo, barrier
from adapters_ds.errors import InputError
from adapters_ds.fileio import read_json, write_json
from adapters_ds.layer import AdapterConfig
from adapters_ds.storage import save_adapter

MARKER = "complete.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from: `auto` = newest complete one (None when there is none yet)."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(checkpoint_root(output_dir))
        return found[-1][1] if found else None
    path = Path(resume)
    if (path / MARKER).is_file():
        return path
    found = complete_checkpoints(checkpoint_root(path)) or complete_checkpoints(path)
    if not found:
        raise InputError(f"--resume {resume!r}: no complete checkpoint there (expected a folder with {MARKER})")
    return found[-1][1]


def _rng_state() -> dict[str, torch.Tensor]:
    return {"cpu": torch.get_rng_state(), "accelerator": get_accelerator().get_rng_state()}


def save_checkpoint(
    engine, output_dir: Path, step: int, adapter_config: AdapterConfig, info: DistInfo, keep: int
) -> Path:
    """Save on every rank (collective); rank 0 marks it complete and prunes beyond `keep` (0 keeps all)."""
    root, tag = checkpoint_root(output_dir), f"step-{step}"
    path = root / tag
    if info.is_main and path.exists():
        shutil.rmtree(path)  # an incomplete leftover of a killed run at the same step
    barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state={"global_step": step}, exclude_frozen_parameters=True)
    save_file(_rng_state(), str(path / f"rng-rank{info.rank}.safetensors"))
    save_adapter(engine.module, adapter_config, path / "adapter")
    barrier()
    if info.is_main:
        write_json(path / MARKER, {"step": step, "world_size": info.world_size})
        if keep:
            for _, old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old)
    barrier()
    return path


def load_checkpoint(engine, path: Path, info: DistInfo) -> int:
    """Restore engine, optimizer, scheduler and this rank's RNG; returns the step to continue from."""
    marker = read_json(path / MARKER, "checkpoint marker")
    if marker["world_size"] != info.world_size:
        raise InputError(
            f"checkpoint {str(path)!r} was written by {marker['world_size']} ranks; this run has {info.world_size} "
            "(exact resume needs the same number of ranks)"
        )
    load_path, client_state = engine.load_checkpoint(
        str(path.parent),
        tag=path.name,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise InputError(f"DeepSpeed could not load checkpoint {str(path)!r}")
    rng = load_file(str(path / f"rng-rank{info.rank}.safetensors"))
    torch.set_rng_state(rng["cpu"])
    get_accelerator().set_rng_state(rng["accelerator"])
    return int(client_state["global_step"])
