"""`--resume auto` on another number of ranks, with another micro-batch split of the same global batch.

Per ZeRO stage (3 and 2, fp32 configs): an uninterrupted 2-rank run (micro-batch 2, 2 accumulation steps) and an
uninterrupted 1-rank run (micro-batch 8, no accumulation), both global batch 8, checkpoints at step 4 and 8; LoRA+
gives the optimizer two parameter groups (DeepSpeed's ZeRO 1-2 links only the first group's optimizer state to the
parameters by itself). Each is the source of a resume on the other number of ranks from its step-4 checkpoint, and
the reference for the resume onto its own number of ranks:

- the resumed run's losses (and learning rates) of steps 5-8 equal the reference's, and so do its final adapter and
  optimizer moments. The tolerance (1e-5) is two orders of magnitude below the loss difference of a resume that
  restores the weights but zeroes the moments or the step count;
- right after loading (in this process, 2 -> 1 rank, and onto the other ZeRO stage), the engine holds exactly
  the checkpoint's adapter weights, optimizer moments, step count, learning rate and schedule position.

Fast, without training: every split of one global batch reads the same examples in every optimizer step (the data
order depends on the global batch only), and which checkpoints resume how, or are refused with a clear error (a
different global batch, no consolidated state, optimizer state on NVMe); the bad-input table of test_reliability.py
runs two of those refusals through the command.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from launch import losses, run, write_train_assets
from safetensors.torch import load_file

from adapters_ds.adapters.base import adapter_parameters
from adapters_ds.adapters.storage import WEIGHTS_NAME
from adapters_ds.errors import InputError
from adapters_ds.fileio import read_json
from adapters_ds.training import trainer
from adapters_ds.training.args import parse_train_args
from adapters_ds.training.checkpoint import MARKER, check_checkpoint
from adapters_ds.training.data import BatchPlan
from adapters_ds.training.trainable_state import META, gather_trainable_state, read_trainable_state

STEPS, SAVE, BATCH = 8, 4, 8
MICRO = {2: 2, 1: 8}  # per number of ranks: 2 x 2 x 2 accumulation steps, 1 x 8: the same global batch
LAUNCHER = {2: "deepspeed", 1: "python"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_train_assets(tmp_path_factory.mktemp("resume_world_size"))


def args(assets: Path, out: Path, config: str, ranks: int, *extra: str) -> list[str]:
    return [
        "--base_model", str(assets / "base"), "--data_path", str(assets / "data.json"), "--output_dir", str(out),
        "--ds_config", str(assets / f"{config}_fp32.json"), "--cutoff_len", "48", "--micro_batch_size",
        str(MICRO[ranks]), "--batch_size", str(BATCH), "--max_steps", str(STEPS), "--save_steps", str(SAVE),
        "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0", "--learning_rate", "2e-2",
        "--val_set_size", "0", "--logging_steps", "4", "--seed", "7", "--lora_plus_ratio", "4", *extra,
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------ without training

LENGTHS = [(i * 37) % 101 + 1 for i in range(203)]


@pytest.mark.parametrize("group", [False, True], ids=["shuffled", "grouped-by-length"])
def test_every_split_of_a_global_batch_reads_the_same_examples_in_every_step(group):
    splits = [(1, 8, 1), (2, 2, 2), (2, 4, 1), (4, 1, 2), (1, 1, 8), (8, 1, 1)]  # ranks x micro x accumulation = 8
    per_split = []
    for world, micro, accumulation in splits:
        plans = [BatchPlan(LENGTHS, micro, world, rank, 5, group, accumulation) for rank in range(world)]
        assert plans[0].micro_batches_per_epoch == len(LENGTHS) // 8 * accumulation
        steps = []
        for step in range(len(LENGTHS) // 8):
            window = slice(step * accumulation, (step + 1) * accumulation)  # the trainer's micro-batches of a step
            steps.append(sorted(i for plan in plans for batch in plan.micro_batches(2)[window] for i in batch))
        per_split.append(steps)
    assert all(steps == per_split[0] for steps in per_split)  # the same examples, step for step
    assert len({i for step in per_split[0] for i in step}) == len(LENGTHS) // 8 * 8  # none twice in an epoch


def marked(tmp_path: Path, consolidated: bool = True, **marker) -> Path:
    folder = tmp_path / "checkpoints" / "step-4"
    folder.mkdir(parents=True)
    layout = {"step": 4, "world_size": 2, "batch_size": 8, "micro_batch_size": 2, "zero_stage": 3, **marker}
    (folder / MARKER).write_text(json.dumps(layout))
    if consolidated:
        (folder / META).write_text("{}")
    return folder


def config(stage: int = 3, batch: int = 8, **zero) -> dict:
    return {"train_batch_size": batch, "zero_optimization": {"stage": stage, **zero}, "bf16": {"enabled": True}}


def test_which_checkpoints_resume_how(tmp_path):
    two, one = (SimpleNamespace(rank=0, local_rank=0, world_size=n, is_main=True) for n in (2, 1))
    folder = marked(tmp_path)
    assert check_checkpoint(folder, two, config()) is True  # DeepSpeed's own files (any micro-batch split)
    assert check_checkpoint(folder, one, config()) is False  # consolidated state, partitioned for 1 rank
    assert check_checkpoint(folder, two, config(stage=2)) is False  # another ZeRO stage
    with pytest.raises(InputError, match="global batch of 8 examples per step; this run has 16"):
        check_checkpoint(folder, one, config(batch=16))
    with pytest.raises(InputError, match="optimizer state is swapped to NVMe"):
        check_checkpoint(folder, one, config(offload_optimizer={"device": "nvme"}))
    with pytest.raises(InputError, match="16 bits without ZeRO"):
        check_checkpoint(folder, one, config(stage=0))
    with pytest.raises(InputError, match="written by 2 rank.s., ZeRO stage 3 without the consolidated"):
        check_checkpoint(marked(tmp_path / "old", consolidated=False), one, config())


# ------------------------------------------------------------------------------------------------ with training


@pytest.fixture(scope="module", params=["zero3", "zero2"])
def uninterrupted(request, assets) -> tuple[str, dict[int, Path]]:
    """(config, {ranks: run folder}) of the two uninterrupted runs."""
    config, runs = request.param, {}
    for ranks in (2, 1):
        runs[ranks] = assets / f"{config}-{ranks}-ranks"
        run(args(assets, runs[ranks], config, ranks), launcher=LAUNCHER[ranks], nproc=ranks)
    return config, runs


def interrupted_copy(source: Path, dest: Path) -> Path:
    """`source` as a run stopped right after its step-SAVE checkpoint leaves it (the later log lines are dropped by
    the resume itself)."""
    shutil.copytree(source, dest)
    shutil.rmtree(dest / "adapter")
    shutil.rmtree(dest / "checkpoints" / f"step-{STEPS}")
    (dest / "checkpoints" / "latest").write_text(f"step-{SAVE}")
    return dest


def log_field(run_dir: Path, field: str) -> list[float]:
    return [json.loads(line)[field] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(("source", "target"), [(2, 1), (1, 2)], ids=["2-to-1-ranks", "1-to-2-ranks"])
def test_resume_on_another_number_of_ranks_continues_as_an_uninterrupted_run_there(
    assets, uninterrupted, tmp_path, source, target
):
    config, runs = uninterrupted
    out = interrupted_copy(runs[source], tmp_path / "resumed")
    assert read_json(out / "checkpoints" / f"step-{SAVE}" / MARKER, "marker") == {
        "step": SAVE, "world_size": source, "batch_size": BATCH, "micro_batch_size": MICRO[source],
        "zero_stage": int(config[-1]),
    }  # fmt: skip
    result = run([*args(assets, out, config, target), "--resume", "auto"], launcher=LAUNCHER[target], nproc=target)
    assert f"resumed from {out / 'checkpoints' / f'step-{SAVE}'} at step {SAVE} on {target} rank(s)" in (
        result.stdout + result.stderr
    )
    reference = runs[target]
    got, expected = losses(out), losses(reference)
    assert got[:SAVE] == losses(runs[source])[:SAVE]  # the steps before the interruption, as the source ran them
    assert got[SAVE:] == pytest.approx(expected[SAVE:], abs=1e-5), (got, expected)
    assert log_field(out, "lr")[SAVE:] == log_field(reference, "lr")[SAVE:]  # the same schedule position
    resumed, straight = load_file(out / "adapter" / WEIGHTS_NAME), load_file(reference / "adapter" / WEIGHTS_NAME)
    assert set(resumed) == set(straight)
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-5, rtol=0)
    (state, meta), (ref_state, ref_meta) = (
        read_trainable_state(run_dir / "checkpoints" / f"step-{STEPS}") for run_dir in (out, reference)
    )
    assert meta["optimizer_step"] == ref_meta["optimizer_step"] == STEPS and set(state) == set(ref_state)
    assert len(meta["param_groups"]) == 2  # LoRA+: B in a group of its own
    for key, tensor in ref_state.items():  # weights and both Adam moments after the last step
        torch.testing.assert_close(state[key], tensor, atol=1e-5, rtol=1e-4)


@pytest.fixture
def in_process():
    """The trainer in this process sets RANK/MASTER_PORT and SIGTERM/SIGUSR1 handlers: put back afterwards."""
    environ = dict(os.environ)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    os.environ.clear()
    os.environ.update(environ)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.mark.slow
def test_loaded_state_is_the_checkpoint_state_exactly_on_another_rank_count_and_zero_stage(
    assets, uninterrupted, tmp_path, in_process
):
    """The 2-rank checkpoint loaded into 1 rank of the other ZeRO stage (3 -> 2, 2 -> 3)."""
    config, runs = uninterrupted
    other = {"zero3": "zero2", "zero2": "zero3"}[config]
    out = interrupted_copy(runs[2], tmp_path / "resumed")
    parsed = parse_train_args(args(assets, out, other, 1, "--resume", "auto"))
    run_ = trainer.Trainer(parsed, parsed.base_model)
    assert run_.resume() == SAVE
    tensors, meta = gather_trainable_state(run_.engine)
    saved, saved_meta = read_trainable_state(out / "checkpoints" / f"step-{SAVE}")
    assert set(tensors) == set(saved) and len(saved) == 3 * len(meta["names"]) > 0  # weights, exp_avg, exp_avg_sq
    for key, tensor in saved.items():
        assert torch.equal(tensors[key], tensor), key
    adapter = load_file(out / "checkpoints" / f"step-{SAVE}" / "adapter" / WEIGHTS_NAME)
    params = adapter_parameters(run_.engine.module)
    assert set(params) == set(adapter)
    for name, tensor in adapter.items():  # the working copy the forward uses, too
        assert torch.equal(params[name].detach().cpu(), tensor), name
    assert meta["optimizer_step"] == saved_meta["optimizer_step"] == SAVE
    assert meta["lr_scheduler"]["last_epoch"] == saved_meta["lr_scheduler"]["last_epoch"] == SAVE
    assert run_.engine.get_lr() == [group["lr"] for group in saved_meta["param_groups"]]
    assert run_.engine.global_steps == SAVE and run_.engine.global_samples == SAVE * BATCH
