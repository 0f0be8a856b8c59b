"""In-process pieces of training: DeepSpeed config resolution, the persistence threshold, launcher
environments, the schedule, the command line."""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from adapters_ds import InputError
from adapters_ds.distributed import map_launcher_env
from adapters_ds.hardware import native_bf16
from adapters_ds.training.args import adapter_config, parse_train_args
from adapters_ds.training.ds_config import resolve_ds_config
from adapters_ds.training.trainer import lr_lambda

BATCH = dict(world_size=2, micro_batch_size=4, batch_size=32, learning_rate=1e-4, weight_decay=0.0, max_grad_norm=1.0)


def shipped(name: str) -> dict:
    return json.loads((REPO / "ds_configs" / f"{name}.json").read_text())


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload", "zero3_nvme"])
def test_shipped_configs_resolve(name):
    config = resolve_ds_config(shipped(name), **BATCH)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["train_batch_size"] == 32
    assert config["gradient_accumulation_steps"] == 4  # 32 / (4 × 2 ranks)
    assert config["optimizer"]["params"]["lr"] == 1e-4 and config["gradient_clipping"] == 1.0
    assert config["bf16"] == {"enabled": native_bf16()}  # "auto": bf16 where the hardware has it
    assert shipped(name)["train_batch_size"] == "auto"  # the input is not modified


@pytest.mark.parametrize(
    "change,message",
    [
        ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu=8 conflicts with --micro_batch_size 4"),
        ({"train_batch_size": 64}, "train_batch_size=64 conflicts with --batch_size 32"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, "optimizer.params.lr=0.1 conflicts with"),
        ({"scheduler": {"type": "WarmupLR"}}, "has a 'scheduler' section"),
        ({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}, "'auto' values adapters_ds does not fill"),
    ],
)
def test_conflicting_config_values_name_both(change, message):
    with pytest.raises(InputError, match=message):
        resolve_ds_config({**shipped("zero3"), **change}, **BATCH)


def test_batch_size_must_split_over_ranks():
    with pytest.raises(InputError, match="--batch_size 12 must be a multiple of --micro_batch_size 4 × 2 rank"):
        resolve_ds_config(shipped("zero3"), **{**BATCH, "batch_size": 12})


def test_srun_environment_is_mapped():
    env = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu-a", "SLURM_JOB_ID": "12345"}  # fmt: skip
    map_launcher_env(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("3", "1", "4")
    assert env["MASTER_ADDR"] == "gpu-a" and env["MASTER_PORT"] == str(15000 + 12345 % 20000)


@pytest.mark.parametrize(
    "env",
    [
        {"RANK": "1", "WORLD_SIZE": "2", "SLURM_STEP_NUM_TASKS": "2"},  # deepspeed/torchrun inside srun: keep
        {"OMPI_COMM_WORLD_SIZE": "2"},  # mpirun: DeepSpeed asks mpi4py
    ],
)
def test_launcher_variables_are_left_alone(env):
    before = dict(env)
    map_launcher_env(env)
    assert env == before


def test_lone_process_gets_one_rank():
    env = {}
    map_launcher_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert 0 < int(env["MASTER_PORT"]) < 65536


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]),
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
        ("cosine", [0.0, 0.5, 1.0, 0.8535533905932737, 0.5, 0.14644660940672627]),
    ],
)
def test_schedule_warms_up_then_decays(kind, expected):
    assert [lr_lambda(s, warmup=2, total=6, kind=kind) for s in range(6)] == pytest.approx(expected)


def test_command_line_maps_onto_adapter_configs():
    argv = ["--ds_config", "x", "--adapter", "series", "--bottleneck_size", "64", "--scaling", "learned"]
    series = parse_train_args([*argv, "--series_preset", "houlsby", "--adapter_dropout", "0.1"])
    config = adapter_config(series)
    assert (config.method, config.bottleneck_size, config.scaling, config.preset, config.dropout) == (
        "series", 64, "learned", "houlsby", 0.1)  # fmt: skip
    lora = adapter_config(parse_train_args(["--ds_config", "x", "--lora_r", "8", "--target_modules", "q_proj,v_proj"]))
    assert (lora.r, lora.target_modules) == (8, ("q_proj", "v_proj"))
    args = parse_train_args(["--ds_config", "x", "--no_train_on_inputs", "--val_set_size", "120", "--local_rank=1"])
    assert args.train_on_inputs is False and args.val_set_size == 120 and isinstance(args.val_set_size, int)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--ds_config", "x", "--bogus", "1"], "unrecognized arguments: --bogus"),
        (["--ds_config", "x", "--micro_batch_size", "0"], "--micro_batch_size must be >= 1"),
        (["--ds_config", "x", "--val_set_size", "2.5"], "--val_set_size must be a count or a fraction"),
        (["--ds_config", "x", "--lr_scheduler", "poly"], "invalid choice: 'poly'"),
        (["--ds_config", "x", "--lora_r", "0"], "lora r must be a positive integer"),
    ],
)
def test_bad_command_lines(argv, message):
    with pytest.raises(InputError, match=message):
        adapter_config(parse_train_args(argv))
