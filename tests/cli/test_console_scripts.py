"""The installed console scripts are the same commands as `launcher/*.py` (both call `adapters_ds.cli`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from launch import REPO, env

SCRIPTS = {
    "adapters-ds-train": "train.py",
    "adapters-ds-evaluate": "evaluate.py",
    "adapters-ds-export": "export.py",
}


def installed(name: str) -> str | None:
    return shutil.which(name, path=str(Path(sys.executable).parent))


@pytest.mark.parametrize("script,launcher", SCRIPTS.items())
def test_console_script_and_launcher_print_the_same_usage(script, launcher):
    path = installed(script)
    if path is None:
        pytest.skip(f"{script} is not installed in this environment (pip install -e . installs it)")
    via_script = subprocess.run([path, "--help"], capture_output=True, text=True, env=env(), timeout=120)
    via_launcher = subprocess.run([sys.executable, str(REPO / "launcher" / launcher), "--help"], capture_output=True,
                                  text=True, env=env(), timeout=120)  # fmt: skip
    assert via_script.returncode == via_launcher.returncode == 0, via_script.stderr + via_launcher.stderr
    options = lambda text: sorted(set(word for word in text.split() if word.startswith("--")))  # noqa: E731
    assert options(via_script.stdout) == options(via_launcher.stdout) and len(options(via_script.stdout)) > 5


def test_bad_input_through_the_console_script_is_one_line_and_exit_2(tmp_path):
    path = installed("adapters-ds-export")
    if path is None:
        pytest.skip("adapters-ds-export is not installed in this environment")
    proc = subprocess.run([path, "--base_model", str(tmp_path / "none"), "--adapter_dir", str(tmp_path),
                           "--output_dir", str(tmp_path / "out"), "--peft"], capture_output=True, text=True,
                          env=env(), timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "out").exists()
