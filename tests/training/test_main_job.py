"""The main job without --data_path on a tiny model, 2 ranks under ZeRO-3: it trains on the built-in problems and
writes gain.json (accuracies with intervals, the paired gain with its interval and exact McNemar p-value); a prefix
adapter starts from the keys and values the frozen, partitioned model computes for real tokens."""

from __future__ import annotations

import json

import pytest
import torch
from launch import run, write_train_assets
from safetensors.torch import load_file

from adapters_ds import load_base_model
from adapters_ds.adapters.prefix import real_token_prefixes
from adapters_ds.adapters.virtual_tokens import model_dims

pytestmark = pytest.mark.slow


def test_main_job_writes_gain_json_and_prefix_starts_from_real_tokens(tmp_path):
    root = write_train_assets(tmp_path)
    out = tmp_path / "run"
    run(["--ds_config", str(root / "zero3_fp32.json"), "--base_model", str(root / "base"), "--adapter", "prefix",
         "--num_virtual_tokens", "4", "--max_steps", "1", "--learning_rate", "1e-12", "--warmup_ratio", "0",
         "--batch_size", "4", "--micro_batch_size", "2", "--cutoff_len", "512", "--eval_limit", "16",
         "--output_dir", str(out)])  # fmt: skip
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
