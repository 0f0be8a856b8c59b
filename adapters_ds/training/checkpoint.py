"""Engine checkpoints for exact resume: `output_dir/checkpoints/step-N/`.

Each holds DeepSpeed's engine state with the frozen base excluded (adapter weights, optimizer, scheduler),
each rank's RNG state, the adapter files, the trainable parameters' optimizer state consolidated
(`trainable_state.py`), and a `complete.json` marker (step, ranks, global batch, micro-batch, ZeRO stage).
A checkpoint is written under a temporary name (`.step-N.partial`) and renamed to `step-N` only once every rank
has finished and the marker is in; `latest` (DeepSpeed's pointer file, read by `zero_to_fp32.py` and
`load_checkpoint(tag=None)`) is then rewritten to name it. A run killed while saving therefore leaves the previous
checkpoint and `latest` as they were, plus a partial folder that resume skips with a warning and the next save
removes.

Resuming: with the same number of ranks and ZeRO stage, DeepSpeed loads its own files, exactly, and each rank
gets its RNG state back. With another number of ranks (a requeued job that comes back with a different allocation)
or ZeRO stage, the consolidated state is partitioned for this run instead: the same adapter weights, optimizer
moments, step count, learning rate and schedule position, so every later step computes what an uninterrupted run
with this layout computes from the same state (the data order depends on the global batch only,
`data.BatchPlan`). The RNG streams (dropout) cannot carry over, as there is one per rank: every rank is re-seeded
with `seed + step`, so the resumed run is reproducible but its dropout masks differ from those the old layout
would have drawn. A different global batch is refused: the step count, the data position and the schedule would
no longer mean the same.

The engine files are pickles (DeepSpeed's `torch.save`, loaded with `weights_only=False`, so loading one can run
code): the trainer loads them from its own output_dir only, unless `--allow_pickle` says a checkpoint from
elsewhere is trusted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from deepspeed.accelerator import get_accelerator
from safetensors.torch import load_file, save_file
from transformers import set_seed

from adapters_ds.adapters.base import AdapterConfig
from adapters_ds.adapters.storage import save_adapter
from adapters_ds.distributed import Ranks
from adapters_ds.errors import InputError
from adapters_ds.fileio import atomic_write_text, read_json, write_json
from adapters_ds.training.trainable_state import (
    META,
    consolidates,
    load_trainable_state,
    save_trainable_state,
    unsupported,
)

logger = logging.getLogger(__name__)

MARKER = "complete.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_PARTIAL_DIR = re.compile(r"^\.step-(\d+)\.partial$")


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


def partial_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint a killed save left behind: its temporary folder, or a `step-N` without
    the marker (what a save in place, as earlier versions did, leaves)."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        partial = _PARTIAL_DIR.match(path.name)
        unmarked = _STEP_DIR.match(path.name) if not (path / MARKER).is_file() else None
        if (partial or unmarked) and path.is_dir():
            found.append((int((partial or unmarked).group(1)), path))
    return sorted(found)


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from: `auto` = newest complete one (None when there is none yet).
    Partial checkpoints newer than the one chosen are skipped with a warning."""
    if resume is None:
        return None
    if resume == "auto":
        root = checkpoint_root(output_dir)
    else:
        path = Path(resume)
        if (path / MARKER).is_file():
            return path
        root = checkpoint_root(path) if checkpoint_root(path).is_dir() else path
    found = complete_checkpoints(root)
    chosen = found[-1] if found else None
    skipped = [p for step, p in partial_checkpoints(root) if chosen is None or step >= chosen[0]]
    if skipped and Ranks(start=False).is_main:
        logger.warning(
            "skipping incomplete checkpoint(s) %s (a run killed while saving); resuming from %s",
            [p.name for p in skipped],
            chosen[1] if chosen else "the start",
        )
    if chosen is None and resume != "auto":
        raise InputError(f"--resume {resume!r}: no complete checkpoint there (expected a folder with {MARKER})")
    return chosen[1] if chosen else None


def _rng_state() -> dict[str, torch.Tensor]:
    return {"cpu": torch.get_rng_state(), "accelerator": get_accelerator().get_rng_state()}


def save_checkpoint(engine, output_dir: Path, step: int, adapter_config: AdapterConfig, info: Ranks, keep: int) -> Path:
    """Save on every rank (collective); rank 0 completes it (marker, rename, `latest`) and prunes beyond `keep`
    (0 keeps all)."""
    root, tag = checkpoint_root(output_dir), f".step-{step}.partial"
    tmp, path = root / tag, root / f"step-{step}"
    if info.is_main:
        for _, leftover in partial_checkpoints(root):  # never resumable: what killed saves left
            shutil.rmtree(leftover)
    info.barrier()
    engine.save_checkpoint(
        str(root), tag=tag, client_state={"global_step": step}, save_latest=False, exclude_frozen_parameters=True
    )
    save_file(_rng_state(), str(tmp / f"rng-rank{info.rank}.safetensors"))
    save_adapter(engine.module, adapter_config, tmp / "adapter")
    if consolidates(engine):
        save_trainable_state(engine, tmp, info.is_main)
    info.barrier()
    if info.is_main:
        write_json(tmp / MARKER, {"step": step, **_layout(engine, info)})
        if path.exists():  # written before by a run that was then resumed from an earlier checkpoint
            _remove(path)
        os.replace(tmp, path)
        atomic_write_text(root / LATEST, path.name)
        if keep:
            for _, old in complete_checkpoints(root)[:-keep]:
                _remove(old)
    info.barrier()
    return path


def _remove(path: Path) -> None:
    """Delete a checkpoint marker first: a kill mid-delete leaves a folder resume skips, never a broken one it picks."""
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path)


def _layout(engine, info: Ranks) -> dict[str, int]:
    """What a checkpoint's files depend on, as recorded in its marker."""
    return {
        "world_size": info.world_size,
        "batch_size": engine.train_batch_size(),
        "micro_batch_size": engine.train_micro_batch_size_per_gpu(),
        "zero_stage": int(engine.zero_optimization_stage()),
    }


def _marker(path: Path) -> dict:
    marker = read_json(path / MARKER, "checkpoint marker")
    if not isinstance(marker, dict) or not isinstance(marker.get("world_size"), int):
        raise InputError(f"checkpoint {str(path)!r}: expected a marker with the ranks that wrote it; found {marker!r}")
    return marker


def check_checkpoint(path: Path, info: Ranks, ds_config: dict) -> bool:
    """Refuse, before any work, a checkpoint this run cannot resume. True when DeepSpeed can load it as it was
    written (same number of ranks and ZeRO stage), False when its consolidated state is partitioned for this run."""
    marker = _marker(path)
    batch, stage = ds_config["train_batch_size"], int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if marker.get("batch_size", batch) != batch:
        raise InputError(
            f"checkpoint {str(path)!r} was trained with a global batch of {marker['batch_size']} examples per step; "
            f"this run has {batch}: resume with --batch_size {marker['batch_size']} (the micro-batch and the number "
            "of ranks may change, the global batch may not: steps, data position and schedule depend on it)"
        )
    if marker["world_size"] == info.world_size and marker.get("zero_stage", stage) == stage:
        return True
    written = f"{marker['world_size']} rank(s)"
    if "zero_stage" in marker:
        written += f", ZeRO stage {marker['zero_stage']}"
    here = f"{info.world_size} rank(s), ZeRO stage {stage}"
    if not (path / META).is_file():
        raise InputError(
            f"checkpoint {str(path)!r} was written by {written} without the consolidated optimizer state that "
            f"resuming on another layout needs (an earlier version, or a configuration that cannot write it); "
            f"this run has {here}: resume it with {marker['world_size']} ranks"
        )
    reason = unsupported(ds_config)
    if reason is not None:
        raise InputError(
            f"checkpoint {str(path)!r} was written by {written}; this run has {here}, and resuming on another "
            f"layout is not supported here: {reason}"
        )
    return False


def load_checkpoint(engine, path: Path, info: Ranks, seed: int) -> int:
    """Restore the adapter weights, optimizer and scheduler from `path` (its DeepSpeed files when the layout is
    the same, else its consolidated state), and this rank's RNG (re-seeded with `seed + step` on another layout);
    returns the step to continue from. `check_checkpoint` has accepted `path` before."""
    marker, here = _marker(path), _layout(engine, info)
    step = int(marker["step"])
    same_stage = marker.get("zero_stage", here["zero_stage"]) == here["zero_stage"]
    if marker["world_size"] != info.world_size or not same_stage:
        load_trainable_state(engine, path)
        set_seed(seed + step)  # one RNG stream per rank was saved: they cannot be mapped onto other ranks
        return step
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


def check_resume_source(resume: str | None, output_dir: str | Path, allow_pickle: bool) -> None:
    """DeepSpeed's engine checkpoints are pickles (loading one can run code): load those this run's output_dir
    holds (written by this tool), others only with --allow_pickle."""
    if resume in (None, "auto") or allow_pickle:
        return
    if not Path(resume).resolve().is_relative_to(Path(output_dir).resolve()):
        raise InputError(
            f"--resume {resume!r} lies outside --output_dir {str(output_dir)!r}; DeepSpeed checkpoints are "
            "pickle files, which can run code when loaded: pass --allow_pickle if you trust it"
        )


def trim_log(path: Path, step: int) -> None:
    """Keep the log lines of steps up to `step`: a resumed run redoes the later ones (a kill may also have cut the
    last line short)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))
