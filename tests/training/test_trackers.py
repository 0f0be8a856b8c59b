"""--report_to as DeepSpeed monitor sections (the runs themselves: tests/training/test_recipes.py)."""

from __future__ import annotations

import importlib.util
import os

import pytest
from deepspeed.monitor.comet import EventsLogScheduler
from deepspeed.monitor.config import get_monitor_config

from adapters_ds.errors import InputError
from adapters_ds.training.ds_config import TRACKERS, monitor_config, monitor_sections


def test_report_to_gives_deepspeed_monitor_sections(tmp_path):
    sections = monitor_config("tensorboard,csv", tmp_path)
    assert sections == {
        "tensorboard": {"enabled": True, "output_path": str(tmp_path / "tensorboard"), "job_name": "train"},
        "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "train"},
    }
    assert monitor_config("none", tmp_path) == {}
    for bad in ("tensorbord", "none,csv", ""):
        with pytest.raises(InputError, match="--report_to: expected 'none' or some of tensorboard, csv, wandb, comet"):
            monitor_config(bad, tmp_path)


def test_every_tracker_is_a_deepspeed_monitor_that_gets_every_step(tmp_path, monkeypatch):
    """DeepSpeed's own config model accepts each section (it refuses unknown keys), and Comet's monitor logs an
    event at every optimizer step, as the other trackers do (its default interval would keep one in 100)."""
    monkeypatch.delenv("WANDB_DIR", raising=False)
    config = get_monitor_config(monitor_sections(list(TRACKERS), tmp_path))
    assert all(section.enabled for section in (config.tensorboard, config.csv_monitor, config.wandb, config.comet))
    assert os.environ["WANDB_DIR"] == str(tmp_path)  # W&B's local files in the run folder
    comet = EventsLogScheduler(config.comet.samples_log_interval)
    assert all(comet.needs_logging(name, step) for step in (1, 2, 3, 5) for name in ("train/loss", "train/lr"))


@pytest.mark.skipif(importlib.util.find_spec("comet_ml") is not None, reason="comet_ml is installed here")
def test_a_tracker_without_its_package_is_an_error(tmp_path):
    with pytest.raises(InputError, match="--report_to comet: expected the 'comet_ml' package installed"):
        monitor_config("tensorboard,comet", tmp_path)
