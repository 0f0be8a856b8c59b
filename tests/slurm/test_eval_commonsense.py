"""slurm/eval_commonsense.sh under stand-in `srun` / `scontrol`: the commonsense defaults it gives slurm/launch.sh's
evaluation (data sets, output folder apart from the math one, 32 new tokens, the scoring mode) and what the user's
settings override. The real cluster run of the evaluation logic is tests/slurm/test_slurm.py's (eval.sh)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SRUN = """#!/bin/bash
echo "srun $*" >>"$CALLS"
"""
SCONTROL = """#!/bin/bash
case "$1 $2" in
"show hostnames") echo node01 ;;
esac
"""


@pytest.fixture
def job(tmp_path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "commonsense").mkdir()
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "CALLS": str(tmp_path / "calls.txt"),
        "REPO": str(REPO),
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "node01",
        "SLURM_NTASKS_PER_NODE": "2",
        "GPUS_PER_NODE": "0",
        "MODEL": "/models/base",
        "ADAPTER_DIR": str(tmp_path / "run" / "adapter"),
        "EVAL_DATA": str(tmp_path / "commonsense"),
        "PYTHON": sys.executable,
    }


def _run(job, **overrides):
    result = subprocess.run(
        ["bash", str(REPO / "slurm" / "eval_commonsense.sh")],
        env={**job, **overrides},
        capture_output=True,
        text=True,
        timeout=60,
    )
    calls = Path(job["CALLS"]).read_text().splitlines() if Path(job["CALLS"]).exists() else []
    Path(job["CALLS"]).unlink(missing_ok=True)
    return result, calls


def test_commonsense_defaults_and_overrides(job, tmp_path):
    result, calls = _run(job)
    assert result.returncode == 0, result.stdout + result.stderr
    (srun,) = calls
    assert srun.startswith("srun --nodes=1 --ntasks-per-node=2 ")
    assert f"launcher/evaluate.py --base_model /models/base --datasets boolq,piqa,social_i_qa,hellaswag,winogrande," \
           f"ARC-Challenge,ARC-Easy,openbookqa --data_dir {tmp_path}/commonsense" in srun  # fmt: skip
    assert f"--output_dir {tmp_path}/run/eval_commonsense --adapter_dir {tmp_path}/run/adapter" in srun
    assert srun.endswith("--max_new_tokens 32 --compare_label_scoring")

    result, calls = _run(job, LABEL_SCORING="on", EVAL_ARGS="--batch_size 4 --max_new_tokens 16", EVAL_DATASETS="a,b")
    assert result.returncode == 0 and "--datasets a,b " in calls[0]
    assert calls[0].endswith("--max_new_tokens 32 --label_scoring --batch_size 4 --max_new_tokens 16")  # user's last
    result, calls = _run(job, LABEL_SCORING="off", EVAL_OUTPUT=str(tmp_path / "elsewhere"))
    assert calls[0].endswith("--max_new_tokens 32") and f"--output_dir {tmp_path}/elsewhere " in calls[0]

    result, calls = _run(job, LABEL_SCORING="maybe")
    assert result.returncode == 2 and calls == []
    assert "LABEL_SCORING=maybe: expected compare, on or off" in result.stderr
