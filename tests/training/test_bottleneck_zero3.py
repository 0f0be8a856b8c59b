"""Series and Parallel at the reference bottleneck (256) under the shipped ZeRO-3 config on the embedded model
(SmolLM2-135M: grouped-query k/v projections of 110,592 elements, smaller than the adapters' 147,456 and 393,216):
2 ranks through the real launcher, the adapters replicated, the base partitioned, the same losses as one process
without ZeRO."""

from __future__ import annotations

import json

import pytest
from launch import REPO, losses, run

from adapters_ds.demo.default_model import default_model_dir, is_complete
from adapters_ds.demo.problems import generate_records

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not is_complete(default_model_dir()), reason="the embedded model is prepared by .ci/setup"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bottleneck")
    (root / "data.json").write_text(json.dumps(generate_records(8, seed=0, split="train")))
    for name, stage in (("zero3", None), ("nozero", 0)):  # the shipped ZeRO-3 config, in fp32 to compare exactly
        config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
        config["bf16"] = {"enabled": False}
        if stage is not None:
            config["zero_optimization"] = {"stage": stage}
        (root / f"{name}.json").write_text(json.dumps(config))
    return root


def train(root, method: str, config: str, nproc: int) -> tuple:
    out = root / f"{method}-{config}-{nproc}"
    micro = 4 // nproc
    run(["--ds_config", str(root / f"{config}.json"), "--base_model", str(default_model_dir()),
         "--data_path", str(root / "data.json"), "--output_dir", str(out), "--adapter", method,
         "--max_steps", "4", "--micro_batch_size", str(micro), "--batch_size", "4", "--cutoff_len", "64",
         "--learning_rate", "5e-3", "--lr_scheduler", "constant", "--logging_steps", "1", "--save_steps", "0"],
        launcher="deepspeed" if nproc > 1 else "python", nproc=nproc)  # fmt: skip
    return out


@pytest.mark.parametrize("method", ["series", "parallel"])
def test_reference_bottleneck_trains_under_zero3_like_one_process(setup, method):
    sharded = train(setup, method, "zero3", 2)
    reports = json.loads((sharded / "zero3_partition.json").read_text())
    assert len(reports) == 2
    for rank in reports:
        assert rank["adapter_local_numel"] == rank["adapter_numel"] > 0  # whole on both ranks
        assert rank["base_local_numel"] <= 0.51 * rank["base_numel"]  # the rest partitioned
        assert rank["base_replicated_share"] < 0.001  # only norms stay whole
    config = json.loads((sharded / "adapter" / "adapter_config.json").read_text())
    assert config["bottleneck_size"] == 256
    steps = losses(sharded)
    assert steps[2] < steps[0] and steps[3] < steps[1]  # the same batches an epoch later (8 records, 4 a step)
    single = losses(train(setup, method, "nozero", 1))
    assert steps == pytest.approx(single, abs=1e-4)
