"""The main job. Without --data_path on a tiny model, 2 ranks under ZeRO-3: it trains on the built-in problems and
writes gain.json (accuracies with intervals, the paired gain with its interval and exact McNemar p-value); a prefix
adapter starts from the keys and values the frozen, partitioned model computes for real tokens. And the README's
command itself, `deepspeed launcher/train.py --ds_config ds_configs/zero3.json` with no model and no data, shortened
through its own command line (options given there win over the demo's): LoRA on the embedded model and the built-in
problems, the base and the adapted model scored, the gain printed and written (skipped where the embedded model is not
prepared; .ci/setup prepares it)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from launch import losses, run, write_train_assets
from safetensors.torch import load_file

from adapters_ds import load_base_model
from adapters_ds.adapters.prefix import real_token_prefixes
from adapters_ds.adapters.virtual_tokens import model_dims
from adapters_ds.demo.default_model import default_model_dir, is_complete

pytestmark = pytest.mark.slow


def test_main_job_writes_gain_json_and_prefix_starts_from_real_tokens(tmp_path):
    root = write_train_assets(tmp_path)
    out = tmp_path / "run"
    # the main job (no --base_model, no --data_path) on a tiny model put where the embedded one is looked for
    home = tmp_path / "home"
    shutil.copytree(root / "base", home / default_model_dir().name)
    run(["--ds_config", str(root / "zero3_fp32.json"), "--adapter", "prefix",
         "--num_virtual_tokens", "4", "--max_steps", "1", "--learning_rate", "1e-12", "--warmup_ratio", "0",
         "--batch_size", "4", "--micro_batch_size", "2", "--cutoff_len", "512", "--eval_limit", "16",
         "--output_dir", str(out)], env_extra={"ADAPTERS_DS_HOME": str(home)})  # fmt: skip
    gain = json.loads((out / "gain.json").read_text())
    assert gain["adapter"] == "prefix" and gain["n"] == 16 and "exact McNemar" in gain["test"]
    for model in ("base", "adapted"):
        lo, hi = gain[model]["ci95"]
        assert gain[model]["n"] == 16 and 0 <= lo <= gain[model]["accuracy"] <= hi <= 100
    diff = gain["gain"]
    assert diff["delta"] == pytest.approx(gain["adapted"]["accuracy"] - gain["base"]["accuracy"], abs=0.01)
    assert diff["ci95"][0] <= diff["delta"] <= diff["ci95"][1] and 0 < diff["p_value"] <= 1
    assert (out / "gain.md").read_text().count("|") > 10
    # a learning rate of 1e-12 leaves the prefix where it started: the real tokens' keys and values, computed by the
    # model partitioned over 2 ranks equal those of the whole model in one process
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    ids = tuple(config["init_token_ids"])
    assert len(ids) == 4
    base = load_base_model(str(root / "base"), dtype="float32")
    expected = real_token_prefixes(base, ids, model_dims(base))
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    found = torch.stack([saved[f"adapter.prefix_{layer}"] for layer in range(expected.shape[0])])
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not is_complete(default_model_dir()), reason="the embedded model is prepared by .ci/setup")
def test_the_readme_main_job_trains_the_embedded_model_scores_base_and_adapter_and_writes_the_gain(tmp_path):
    steps, held_out = 2, 4
    out = tmp_path / "demo"
    result = run(["--ds_config", "ds_configs/zero3.json", "--output_dir", str(out), "--max_steps", str(steps),
                  "--eval_limit", str(held_out), "--logging_steps", "1"])  # fmt: skip
    args = json.loads((out / "train_args.json").read_text())
    assert args["base_model"] == str(default_model_dir()) and args["world_size"] == 2
    assert args["args"]["adapter"] == "lora" and args["args"]["data_path"] is None  # the built-in problems
    assert len(losses(out)) == steps and (out / "adapter" / "adapter_model.safetensors").is_file()
    gain = json.loads((out / "gain.json").read_text())
    assert gain["adapter"] == "lora" and gain["n"] == gain["base"]["n"] == gain["adapted"]["n"] == held_out
    assert gain["gain"]["delta"] == pytest.approx(gain["adapted"]["accuracy"] - gain["base"]["accuracy"], abs=0.01)
    table = (out / "gain.md").read_text()
    assert f"held-out built-in problems ({held_out})" in table
    assert table.strip() in result.stdout  # printed as written
