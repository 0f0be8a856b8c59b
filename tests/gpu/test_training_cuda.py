"""Training on CUDA: a bf16 ZeRO-3 run through the deepspeed launcher on NCCL (one rank per GPU), and the host-device
synchronisations of a training step, counted by torch's sync debug mode."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from launch import EXTENSIONS, REPO, run, write_train_assets
from sync_count import cuda_syncs

from adapters_ds.training.attention import BOUNDS, PACKED_SDPA

pytestmark = pytest.mark.gpu


def bf16_zero3(assets) -> str:
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["bf16"] = {"enabled": True}
    path = assets / "zero3_bf16.json"
    path.write_text(json.dumps(config))
    return str(path)


def train_args(assets, out, ds_config: str, steps: int = 2) -> list[str]:
    return [
        "--base_model", str(assets / "base"), "--data_path", str(assets / "data.json"), "--output_dir", str(out),
        "--ds_config", ds_config, "--cutoff_len", "48", "--micro_batch_size", "4", "--batch_size", "8",
        "--max_steps", str(steps), "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "1e-2",
        "--logging_steps", "1", "--save_steps", "0",
    ]  # fmt: skip


def test_bf16_zero3_steps_through_the_deepspeed_launcher(tmp_path, monkeypatch):
    assets = write_train_assets(tmp_path / "assets")
    ranks = max(1, min(2, torch.cuda.device_count()))
    monkeypatch.setenv("NCCL_DEBUG", "VERSION")  # NCCL announces itself when the process group starts
    result = run(train_args(assets, tmp_path / "run", bf16_zero3(assets), steps=3), nproc=ranks, timeout=600)
    output = result.stdout + result.stderr
    if torch.cuda.is_available():
        assert "NCCL version" in output, output[-3000:]
    assert "ZeRO stage 3, bf16" in output
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3]
    assert all(math.isfinite(entry["loss"]) and math.isfinite(entry["grad_norm"]) for entry in log)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    partition = json.loads((tmp_path / "run" / "zero3_partition.json").read_text())
    assert len(partition) == ranks and partition[0]["adapter_local_numel"] == partition[0]["adapter_numel"]


@pytest.fixture
def in_process(monkeypatch):
    """The trainer in this process sets RANK/MASTER_PORT and signal handlers: put back afterwards."""
    environ = dict(os.environ)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(EXTENSIONS))
    yield
    os.environ.clear()
    os.environ.update(environ)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def test_a_training_step_synchronises_once(tmp_path, cuda_only, in_process, record_property):
    """Outside DeepSpeed's own backward and step: the trainer's one read per optimizer step, none in attention or
    mask preparation. The whole breakdown (the loss's reads included) is recorded in the junit XML."""
    from adapters_ds.training.args import parse_train_args
    from adapters_ds.training.trainer import Trainer

    assets = write_train_assets(tmp_path / "assets")
    args = parse_train_args([*train_args(assets, tmp_path / "run", bf16_zero3(assets), steps=3),
                             "--attn_implementation", "sdpa"])  # fmt: skip
    trainer = Trainer(args, args.base_model)
    assert trainer.engine.module.config._attn_implementation == PACKED_SDPA
    trainer.train_step(0)  # warm-up: allocations, first gathers
    with cuda_syncs() as counts:
        trainer.engine.backward = counts.pause(trainer.engine.backward)
        trainer.engine.step = counts.pause(trainer.engine.step)
        results = [trainer.train_step(step) for step in (1, 2)]
    record_property("syncs_by_source_2_steps", json.dumps(dict(counts.by_source)))
    assert not any(r["skipped"] for r in results)
    assert counts.by_source["training/trainer.py"] <= 2, counts.by_source  # one per optimizer step
    for name in ("training/attention.py", "training/packing.py", "transformers/masking_utils.py"):
        assert name not in counts.by_source, counts.by_source
    assert BOUNDS in trainer.batch([0, 1])
