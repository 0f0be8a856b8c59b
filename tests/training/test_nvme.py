"""The shipped `ds_configs/zero3_nvme.json` as printed, only its `nvme_path` pointed at a temporary folder: 2 ranks
train with the frozen base's parameters and the optimizer states swapped to files under it through DeepSpeed's
async_io op, save the adapter, and their losses go down. Skipped where async_io cannot be built (no libaio:
`apt-get install libaio-dev`, which .ci/setup does)."""

from __future__ import annotations

import json

import pytest
import torch
from launch import REPO, losses, run, write_train_assets
from tiny_models import make_model

from adapters_ds import load_adapter
from adapters_ds.hardware import native_bf16


def _async_io() -> bool:
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return AsyncIOBuilder().is_compatible(verbose=False)


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _async_io(), reason="DeepSpeed's async_io op needs libaio: apt-get install libaio-dev"),
]


def test_zero3_nvme_config_trains_with_parameters_and_optimizer_swapped_to_files(tmp_path):
    assets = write_train_assets(tmp_path)
    swap = tmp_path / "nvme"
    config = json.loads((REPO / "ds_configs" / "zero3_nvme.json").read_text())
    for section in ("offload_param", "offload_optimizer"):
        assert config["zero_optimization"][section]["device"] == "nvme"
        config["zero_optimization"][section]["nvme_path"] = str(swap)
    (tmp_path / "nvme.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    run(["--ds_config", str(tmp_path / "nvme.json"), "--base_model", str(assets / "base"),
         "--data_path", str(assets / "data.json"), "--output_dir", str(out), "--cutoff_len", "48",
         "--micro_batch_size", "4", "--batch_size", "8", "--logging_steps", "1", "--lr_scheduler", "constant",
         "--learning_rate", "2e-2", "--lora_r", "4", "--lora_alpha", "8", "--seed", "7",
         "--max_steps", "6"])  # fmt: skip
    steps = losses(out)
    assert len(steps) == 6 and sum(steps[-2:]) < sum(steps[:2])
    # each rank swapped its partition of the parameters and its optimizer states into its own folders under
    # nvme_path (DeepSpeed deletes the swap files themselves when the run ends)
    stage = swap / "zero_stage_3"
    for rank in (0, 1):
        assert [path.name for path in stage.glob(f"*params/rank{rank}")] == [f"rank{rank}"], sorted(stage.rglob("*"))
        assert (stage / "optimizer" / f"rank{rank}").is_dir(), sorted(stage.rglob("*"))
    model = make_model("llama", torch.bfloat16 if native_bf16() else torch.float32)
    assert load_adapter(model, out / "adapter").method == "lora"
