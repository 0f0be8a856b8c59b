"""The training command end to end: real multi-process DeepSpeed runs (2 CPU ranks, gloo) on a tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from launch import REPO, command, env, has_mpirun, losses, run, write_train_assets
from safetensors.torch import load_file
from tiny_models import make_model

from adapters_ds import load_adapter
from adapters_ds.adapters.storage import WEIGHTS_NAME
from adapters_ds.hardware import native_bf16

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny LLaMA with its tokenizer, a learnable toy task, and fp32 variants of the shipped configs."""
    return write_train_assets(tmp_path_factory.mktemp("train"))


# small sizes of the methods these tests train (an option of another method than --adapter's is an error)
METHOD_OPTIONS = {"lora": ["--lora_r", "4", "--lora_alpha", "8"], "series": ["--bottleneck_size", "8"],
                  "parallel": ["--bottleneck_size", "8"]}  # fmt: skip


def common(assets, out, *extra: str) -> list[str]:
    adapter = extra[extra.index("--adapter") + 1] if "--adapter" in extra else "lora"
    return [
        "--base_model", str(assets / "base"), "--data_path", str(assets / "data.json"), "--output_dir", str(out),
        "--cutoff_len", "48", "--micro_batch_size", "4", "--batch_size", "8", "--logging_steps", "2",
        "--lr_scheduler", "constant", "--learning_rate", "2e-2", *METHOD_OPTIONS.get(adapter, []), "--seed", "7",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def straight(assets):
    """2 ranks, ZeRO-3, bf16, LoRA with dropout, 6 steps, checkpoints at 3 and 6, a validation split."""
    out = assets / "straight"
    run(common(assets, out, "--ds_config", "ds_configs/zero3.json", "--max_steps", "6", "--save_steps", "3",
               "--val_set_size", "8", "--eval_steps", "3", "--lora_dropout", "0.1"))  # fmt: skip
    return out


def test_zero3_lora_trains_with_replicated_adapters_and_partitioned_base(straight):
    steps = losses(straight)
    assert len(steps) == 6 and steps[-1] < steps[0]
    reports = json.loads((straight / "zero3_partition.json").read_text())
    assert len(reports) == 2
    for rank in reports:
        assert rank["adapter_local_numel"] == rank["adapter_numel"] > 0  # whole on every rank
        assert rank["base_local_numel"] <= 0.55 * rank["base_numel"]  # about half: partitioned
    args = json.loads((straight / "train_args.json").read_text())
    zero = args["ds_config"]["zero_optimization"]
    assert isinstance(zero["stage3_param_persistence_threshold"], int)
    assert args["ds_config"]["gradient_accumulation_steps"] == 1 and args["world_size"] == 2
    assert sorted(p.name for p in (straight / "checkpoints").iterdir() if p.is_dir()) == ["step-3", "step-6"]


def test_saved_adapter_equals_gathered_trainable_parameters(straight):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    master = get_fp32_state_dict_from_zero_checkpoint(
        str(straight / "checkpoints"), tag="step-6", exclude_frozen_parameters=True
    )
    saved = load_file(straight / "adapter" / WEIGHTS_NAME)
    assert set(saved) == set(master) and len(saved) == 20
    dtype = torch.bfloat16 if native_bf16() else torch.float32  # the shipped configs say bf16 "auto"
    for name, tensor in saved.items():
        assert tensor.dtype == dtype
        assert torch.equal(tensor, master[name].to(dtype)), name
    fresh = make_model("llama", dtype)
    load_adapter(fresh, straight / "adapter")  # loadable without DeepSpeed


def test_tensorboard_event_files_hold_the_tags(straight):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight / "tensorboard" / "train"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/samples_per_s",
                "train/memory_gb", "eval/loss"}  # fmt: skip
    assert expected <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert [e.step for e in events.Scalars("eval/loss")] == [3, 6]


def test_resume_continues_exactly(assets, straight):
    out = assets / "resumed"
    args = common(assets, out, "--ds_config", "ds_configs/zero3.json", "--save_steps", "3", "--val_set_size", "8",
                  "--eval_steps", "3", "--lora_dropout", "0.1")  # fmt: skip
    run([*args, "--max_steps", "3"])
    run([*args, "--max_steps", "6", "--resume", "auto"])
    assert losses(out) == pytest.approx(losses(straight), abs=1e-6)
    resumed, reference = load_file(out / "adapter" / WEIGHTS_NAME), load_file(straight / "adapter" / WEIGHTS_NAME)
    for name in reference:
        torch.testing.assert_close(resumed[name].float(), reference[name].float(), atol=1e-6, rtol=0)


def test_two_rank_zero3_equals_one_process_without_zero(assets):
    """Same global batch (4) and data order: 2 ranks × 2 under ZeRO-3 versus 1 process × 4, fp32."""
    extra = ("--max_steps", "4", "--lora_dropout", "0", "--batch_size", "4")
    one, two = assets / "one-process", assets / "two-ranks"
    run(common(assets, one, "--ds_config", str(assets / "nozero_fp32.json"), "--micro_batch_size", "4", *extra),
        launcher="python", nproc=1)  # fmt: skip
    run(common(assets, two, "--ds_config", str(assets / "zero3_fp32.json"), "--micro_batch_size", "2", *extra))
    assert losses(two) == pytest.approx(losses(one), abs=1e-4)
    assert losses(one)[-1] < losses(one)[0]


@pytest.mark.parametrize(
    "adapter,config,launcher",
    [("series", "ds_configs/zero3.json", "torchrun"), ("parallel", "ds_configs/zero2.json", "deepspeed")],
)
def test_bottleneck_adapters_train(assets, adapter, config, launcher):
    out = assets / f"{adapter}-{launcher}"
    run(common(assets, out, "--ds_config", config, "--adapter", adapter, "--max_steps", "8"),
        launcher=launcher)  # fmt: skip
    steps = losses(out)
    assert sum(steps[-2:]) < sum(steps[:2])  # per-step losses are of different batches: compare pairs
    config = load_adapter(make_model("llama", torch.bfloat16 if native_bf16() else torch.float32), out / "adapter")
    assert config.method == adapter


def test_zero3_offload_runs(assets):
    out = assets / "offload"
    run(common(assets, out, "--ds_config", "ds_configs/zero3_offload.json", "--max_steps", "2"))
    assert (out / "adapter" / WEIGHTS_NAME).is_file() and len(losses(out)) == 2


def test_no_shared_memory_buffer_outlives_start_up(assets):
    """DeepSpeed's CPU all-reduce op creates a 69 MB /dev/shm buffer per rank and never removes it; init_distributed
    removes the names once every rank has mapped them, so a run killed mid-way (or any run) leaves nothing behind."""
    out = assets / "shm"
    cmd = [*command("deepspeed", 2), *common(assets, out, "--ds_config", "ds_configs/zero3.json", "--max_steps", "50")]
    port = cmd[cmd.index("--master_port") + 1]
    with (assets / "shm.log").open("w") as output:  # a file, not a pipe: nobody reads a pipe while the run goes on
        proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        deadline, log = time.monotonic() + 600, out / "train_log.jsonl"
        # the log exists from start-up on; its first line comes after the first logged steps
        while not (log.is_file() and log.read_text().strip()) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        # both ranks are past start-up and training: their buffers would be here now if they were still named
        left = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
        assert proc.poll() is None, (assets / "shm.log").read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert left == []
    assert log.read_text().strip()


@pytest.mark.skipif(not has_mpirun(), reason="Open MPI (mpirun) and mpi4py are not installed")
def test_mpirun_launch_matches_deepspeed_launcher(assets, straight):
    out = assets / "mpirun"
    run(common(assets, out, "--ds_config", "ds_configs/zero3.json", "--max_steps", "2", "--val_set_size", "8",
               "--lora_dropout", "0.1"), launcher="mpirun")  # fmt: skip
    assert losses(out) == pytest.approx(losses(straight)[:2], abs=1e-6)


def test_bad_input_is_one_line_error(assets, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("precious")
    conflicting = tmp_path / "conflict.json"
    conflicting.write_text(json.dumps({**json.loads((assets / "nozero_fp32.json").read_text()),
                                       "train_micro_batch_size_per_gpu": 8}))  # fmt: skip
    cases = [
        (common(assets, busy, "--ds_config", "ds_configs/zero2.json"), "is not empty"),
        (common(assets, tmp_path / "o", "--ds_config", str(conflicting)),
         "train_micro_batch_size_per_gpu=8 conflicts with --micro_batch_size 4"),
        (common(assets, tmp_path / "o", "--ds_config", "ds_configs/zero2.json", "--adapter", "no_such_method"),
         "argument --adapter: invalid choice"),
    ]  # fmt: skip
    for args, message in cases:
        result = run(args, launcher="python", nproc=1, check=False)
        assert result.returncode == 2, result.stderr[-2000:]
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, last
    assert (busy / "keep.txt").read_text() == "precious" and not (tmp_path / "o").exists()


def test_overwrite_output_dir_replaces_an_earlier_run(assets, tmp_path):
    """The folder is emptied before DeepSpeed's TensorBoard monitor opens its files there, not after."""
    out = tmp_path / "run"
    (out / "tensorboard" / "train").mkdir(parents=True)
    (out / "tensorboard" / "train" / "events.old").write_text("stale")
    (out / "stale.txt").write_text("an earlier run")
    run(common(assets, out, "--ds_config", str(assets / "zero3_fp32.json"), "--max_steps", "2",
               "--overwrite_output_dir"), launcher="python", nproc=1)  # fmt: skip
    assert not (out / "stale.txt").exists() and not (out / "tensorboard" / "train" / "events.old").exists()
    assert len(losses(out)) == 2 and (out / "adapter" / WEIGHTS_NAME).is_file()
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))
