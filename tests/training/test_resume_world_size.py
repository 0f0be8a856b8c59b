"""`--resume auto` on another number of ranks, with another micro-batch split of the same global batch.

Per ZeRO stage (3 and 2, fp32 configs): an uninterrupted 2-rank run (micro-batch 2, 2 accumulation steps) and an
uninterrupted 1-rank run (micro-batch 8, no accumulation), both global batch 8, checkpoints at step 4 and 8. Each
is the source of a resume on the other number of ranks from its step-4 checkpoint, and the reference for the resume
onto its own number of ranks:

- the resumed run's losses (and learning rates) of steps 5-8 equal the reference's, and so do its final adapter and
  optimizer moments. The tolerance (1e-5) is far below what a resume that lost the moments (2.7e-3) or the step
  count (1.5e-2) shows on this run;
- right after loading (in this process, 2 -> 1 rank, and onto the other ZeRO stage), the engine holds exactly
  the checkpoint's adapter weights, optimizer moments, step count, learning rate and schedule position.

A different global batch, or a checkpoint without the consolidated state, is refused before anything runs
(test_reliability.py's bad-input table).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from launch import losses, run, write_train_assets
from safetensors.torch import load_file

from adapters_ds.adapters.base import adapter_parameters
from adapters_ds.adapters.storage import WEIGHTS_NAME
from adapters_ds.fileio import read_json
from adapters_ds.training import trainer
from adapters_ds.training.args import parse_train_args
from adapters_ds.training.checkpoint import MARKER
from adapters_ds.training.trainable_state import gather_trainable_state, read_trainable_state

pytestmark = pytest.mark.slow

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
        "--val_set_size", "0", "--logging_steps", "4", "--seed", "7", *extra,
    ]  # fmt: skip


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
