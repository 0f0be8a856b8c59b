"""The README's main job itself, `deepspeed launcher/train.py --ds_config ds_configs/zero3.json` with no model and no
data, shortened through its own command line (options given there win over the demo's): 2 ranks train LoRA on the
embedded model and the built-in problems, then the base model and the adapted model are scored on the held-out
problems and the gain is printed and written. Skipped where the embedded model is not prepared (.ci/setup does)."""

from __future__ import annotations

import json

import pytest
from launch import losses, run

from adapters_ds.demo.default_model import default_model_dir, is_complete

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not is_complete(default_model_dir()), reason="the embedded model is prepared by .ci/setup"),
]
STEPS, HELD_OUT = 2, 4


def test_the_main_job_trains_scores_base_and_adapter_and_writes_the_gain(tmp_path):
    out = tmp_path / "demo"
    result = run(["--ds_config", "ds_configs/zero3.json", "--output_dir", str(out), "--max_steps", str(STEPS),
                  "--eval_limit", str(HELD_OUT), "--logging_steps", "1"])  # fmt: skip
    args = json.loads((out / "train_args.json").read_text())
    assert args["base_model"] == str(default_model_dir()) and args["world_size"] == 2
    assert args["args"]["adapter"] == "lora" and args["args"]["data_path"] is None  # the built-in problems
    assert len(losses(out)) == STEPS and (out / "adapter" / "adapter_model.safetensors").is_file()
    gain = json.loads((out / "gain.json").read_text())
    base, adapted = gain["base model"], gain["with adapter"]
    assert base["n"] == adapted["n"] == HELD_OUT  # every held-out problem scored once, over both ranks
    assert gain["gain_points"] == pytest.approx(adapted["accuracy"] - base["accuracy"])
    table = (out / "gain.md").read_text()
    assert f"held-out built-in problems ({HELD_OUT})" in table
    assert f"| gain | | {gain['gain_points']:+.1f} points |" in table
    assert table.strip() in result.stdout  # printed as written
