"""--report_to as DeepSpeed monitor sections (the runs themselves: tests/training/test_recipes.py)."""

from __future__ import annotations

import importlib.util

import pytest

from adapters_ds.errors import InputError
from adapters_ds.training.ds_config import monitor_config


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


@pytest.mark.skipif(importlib.util.find_spec("comet_ml") is not None, reason="comet_ml is installed here")
def test_a_tracker_without_its_package_is_an_error(tmp_path):
    with pytest.raises(InputError, match="--report_to comet: expected the 'comet_ml' package installed"):
        monitor_config("tensorboard,comet", tmp_path)
