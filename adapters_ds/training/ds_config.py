"""Resolving a DeepSpeed JSON config against the command line and the model.

The command line owns the batch sizes, learning rate, weight decay and clipping: `"auto"` fields take its
values and an explicit value that disagrees is an error naming both (a silent winner would train with a
batch size nobody asked for). The persistence threshold depends on the model and is settled in `persistence.py`.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import deepspeed
import pydantic
import torch
from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS, DeepSpeedConfig, DeepSpeedConfigError

from adapters_ds.errors import InputError
from adapters_ds.fileio import read_json
from adapters_ds.hardware import native_bf16

AUTO = "auto"


def load_ds_config(path: str | Path) -> dict[str, Any]:
    config = read_json(path, "DeepSpeed config")
    if not isinstance(config, dict):
        raise InputError(f"DeepSpeed config {str(path)!r} must be a JSON object, found {type(config).__name__}")
    return config


def _fill(section: dict, key: str, value: Any, where: str, flag: str) -> None:
    current = section.get(key, AUTO)
    if current == AUTO:
        section[key] = value
    elif current != value:
        raise InputError(f'ds_config {where}{key}={current!r} conflicts with {flag} {value!r}; set it to "auto"')


def resolve_ds_config(
    raw: dict[str, Any],
    *,
    world_size: int,
    micro_batch_size: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    max_grad_norm: float,
) -> dict[str, Any]:
    """A copy of `raw` with every command-line-owned field filled in and checked."""
    config = copy.deepcopy(raw)
    if micro_batch_size < 1 or batch_size < 1:
        raise InputError(
            f"batch sizes must be positive, found --micro_batch_size {micro_batch_size} --batch_size {batch_size}"
        )
    per_step = micro_batch_size * world_size
    if batch_size % per_step:
        raise InputError(
            f"--batch_size {batch_size} must be a multiple of "
            f"--micro_batch_size {micro_batch_size} × {world_size} rank(s)"
        )
    _fill(config, "train_micro_batch_size_per_gpu", micro_batch_size, "", "--micro_batch_size")
    _fill(config, "train_batch_size", batch_size, "", "--batch_size")
    _fill(config, "gradient_accumulation_steps", batch_size // per_step, "", "--batch_size / (micro × ranks) =")
    _fill(config, "gradient_clipping", max_grad_norm, "", "--max_grad_norm")
    bf16 = config.get("bf16", {})
    if bf16.get("enabled") == AUTO:  # bf16 where the hardware has it, fp32 where bf16 would be emulated
        config["bf16"] = {**bf16, "enabled": native_bf16()}
    if "scheduler" in config:
        raise InputError("ds_config has a 'scheduler' section; the schedule comes from --lr_scheduler/--warmup_ratio")
    optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    _fill(params, "lr", learning_rate, "optimizer.params.", "--learning_rate")
    _fill(params, "weight_decay", weight_decay, "optimizer.params.", "--weight_decay")
    leftover = sorted(_auto_paths(config))
    if any(not p.endswith("stage3_param_persistence_threshold") for p in leftover):
        raise InputError(f"ds_config has 'auto' values adapters_ds does not fill: {leftover}")
    return config


def check_ds_config(config: dict) -> None:
    """Let DeepSpeed validate the resolved config now: an unknown key would otherwise surface as a traceback from
    inside model loading or `deepspeed.initialize`, after the output folder was made."""
    try:
        name = DeepSpeedConfig(without_persistence_threshold(config)).optimizer_name
    except pydantic.ValidationError as exc:
        found = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InputError(
            f"ds_config is not valid for DeepSpeed {deepspeed.__version__} ({exc.title}): {found}"
        ) from None
    except (DeepSpeedConfigError, AssertionError, ValueError) as exc:
        raise InputError(f"ds_config is not valid for DeepSpeed {deepspeed.__version__}: {exc}") from None
    if name is not None and name not in DEEPSPEED_OPTIMIZERS and getattr(torch.optim, name, None) is None:
        raise InputError(  # DeepSpeed itself would only fail in deepspeed.initialize
            f"ds_config optimizer type {name!r} is neither a DeepSpeed optimizer {DEEPSPEED_OPTIMIZERS} "
            "nor a torch.optim class"
        )


def _auto_paths(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _auto_paths(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if value == AUTO else []


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def compute_dtype(config: dict[str, Any]) -> torch.dtype:
    if config.get("bf16", {}).get("enabled", False):
        return torch.bfloat16
    if config.get("fp16", {}).get("enabled", False):
        return torch.float16
    return torch.float32


def without_persistence_threshold(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of `config` for uses before the adapters exist (validation, partitioned loading): without
    `stage3_param_persistence_threshold`, whose "auto" only `persistence.plan_persistence` can fill."""
    config = copy.deepcopy(config)
    config.get("zero_optimization", {}).pop("stage3_param_persistence_threshold", None)
    return config


TRACKERS = ("tensorboard", "csv", "wandb", "comet")
_TRACKER_PACKAGES = {"wandb": "wandb", "comet": "comet_ml"}


def monitor_config(report_to: str, output_dir: str | Path, job_name: str = "train") -> dict[str, Any]:
    """DeepSpeed monitor sections for `--report_to` (comma-separated trackers, or "none"): DeepSpeed's own
    TensorBoard, CSV, Weights & Biases and Comet monitors, which get the same events (`engine.monitor`), so every
    tracker shows the same metrics under the same names. A tracker whose package is not installed is an
    `InputError` now, not after the model has loaded."""
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    unknown = [name for name in names if name not in (*TRACKERS, "none")]
    if unknown or not names or ("none" in names and len(names) > 1):
        raise InputError(f"--report_to: expected 'none' or some of {', '.join(TRACKERS)}; found {report_to!r}")
    for name in names:
        package = _TRACKER_PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            raise InputError(f"--report_to {name}: expected the {package!r} package installed; found it missing")
    return monitor_sections([name for name in names if name != "none"], output_dir, job_name)


def monitor_sections(trackers: list[str], output_dir: str | Path, job_name: str = "train") -> dict[str, Any]:
    """The DeepSpeed monitor section of each tracker in `trackers` (names from `TRACKERS`). File-based trackers
    write inside the run folder (`tensorboard/`, `csv/`; W&B's local files in `wandb/` unless WANDB_DIR is set).
    Comet logs every event: its monitor's `samples_log_interval` (default 100) would otherwise drop a metric's
    events until that many steps have passed since its last logged one (the events are at optimizer steps)."""
    out = Path(output_dir)
    sections: dict[str, Any] = {}
    if "tensorboard" in trackers:
        sections["tensorboard"] = {"enabled": True, "output_path": str(out / "tensorboard"), "job_name": job_name}
    if "csv" in trackers:
        sections["csv_monitor"] = {"enabled": True, "output_path": str(out / "csv"), "job_name": job_name}
    if "wandb" in trackers:
        os.environ.setdefault("WANDB_DIR", str(out))
        sections["wandb"] = {"enabled": True, "project": "adapters_ds", "group": out.resolve().name}
    if "comet" in trackers:
        sections["comet"] = {
            "enabled": True,
            "project": "adapters_ds",
            "experiment_name": out.resolve().name,
            "samples_log_interval": 1,
        }
    return sections


def finish_trackers(monitor: Any) -> None:
    """End the W&B run and the Comet experiment that DeepSpeed's monitor (`engine.monitor`, or None) started (it
    never does): their last events are flushed and their files complete (Comet's offline archive is empty until
    then) before the process ends (the launcher's ranks may leave without running exit handlers)."""
    comet = getattr(monitor, "comet_monitor", None)
    if comet is not None and comet.experiment is not None:
        comet.experiment.end()
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
