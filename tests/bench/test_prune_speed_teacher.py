"""bench/prune_speed.py's recipe and teachers: the recipe by default (`--plain` without), `--gate teacher=DIR` and
`--teacher_from_lora` reach the gates runs as `--gate_teacher`, keyed by the teacher's settings; a switch without its
weight or its LoRA run is refused."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from launch import REPO


def load_bench():
    spec = importlib.util.spec_from_file_location("prune_speed", REPO / "bench" / "prune_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Recorded:
    """A `Stages` that runs nothing: it records each stage's name and settings and answers with canned results."""

    def __init__(self) -> None:
        self.seen: dict[str, dict] = {}

    def run(self, name: str, settings: dict, compute) -> dict:
        self.seen[name] = settings
        canned = {"blocks_removed_fraction": 0.3, "removed_fraction": 0.2, "max_abs_logit_diff_gated_vs_pruned": 0}
        speed = {"fp32": {"speedup": 1.0}, "bf16": {"speedup": 1.0}}
        return {"adapter_dir": "a", "train": {}, "accuracy": 50.0, **canned, **speed}


def parse(bench, monkeypatch, *argv: str):
    monkeypatch.setattr(sys, "argv", ["prune_speed.py", *argv])
    return bench.parse_args()


TEACHER = {"settings": {"steps": 10, "lr": 1e-3}, "result": {"adapter_dir": "out/lora/adapter"}}


def train_settings(monkeypatch, *argv: str, teacher: dict | None = TEACHER) -> dict:
    """The settings of the 0.3 gates run's training stage under the bench's command line `argv`."""
    bench = load_bench()
    stages = Recorded()
    bench.gates_point("base", parse(bench, monkeypatch, *argv), stages, 0.3, False, {"prompts": [], "records": []},
                      teacher)  # fmt: skip
    return stages.seen["train gates_0.3"]


def test_the_lora_reference_is_the_gates_runs_teacher(monkeypatch):
    settings = train_settings(monkeypatch, "--teacher_from_lora", "--gate", "distill=1", "--steps", "10")
    extra = settings["extra"]
    assert extra[extra.index("--gate_distill") + 1] == "1"
    assert extra[extra.index("--gate_teacher") + 1] == "out/lora/adapter"
    assert settings["teacher"] == TEACHER["settings"]  # a retrained LoRA is another teacher: another stage
    argv = ("--gate", "distill=1", "--gate", "teacher=runs/lora/adapter")
    settings = train_settings(monkeypatch, *argv, teacher=None)
    extra = settings["extra"]
    assert extra[extra.index("--gate_teacher") + 1] == "runs/lora/adapter" and "teacher" not in settings


def test_the_recipe_is_the_default_and_an_option_replaces_its_part(monkeypatch):
    settings = train_settings(monkeypatch)
    teacher = ["--gate_teacher", "out/lora/adapter"]
    recipe = ["--gate_distill", "1", "--gate_warm_start", "--gate_ramp", "0,0.5"]
    runs = ["--gate_width_multiple", "64"]  # the export's rounding: the schedule closes MLP units 64 at a time
    assert settings["extra"] == ["--gate_target_sparsity", "0.3", *recipe, *runs, *teacher] and settings["lr"] == 3e-4
    args = parse(load_bench(), monkeypatch)
    assert args.teacher_from_lora and args.sparsities == [0.2, 0.3, 0.4, 0.5]
    from adapters_ds.training.args import adapter_config, parse_train_args

    config = adapter_config(parse_train_args(["--ds_config", "x.json", "--adapter", "gates", *settings["extra"]]))
    assert config.warm_start and config.distill == 1 and config.ramp_fractions == (0, 0.5)
    assert config.teacher == "out/lora/adapter" and config.width_multiple == 64
    extra = train_settings(monkeypatch, "--gate", "ramp=0.1,0.6", "--gate", "distill=2")["extra"]
    assert extra[2:] == ["--gate_warm_start", "--gate_ramp", "0.1,0.6", "--gate_distill", "2", *runs, *teacher]
    extra = train_settings(monkeypatch, "--width_multiple", "1")["extra"]
    assert extra[extra.index("--gate_width_multiple") + 1] == "1"  # unit by unit, as the export rounds nothing
    extra = train_settings(monkeypatch, "--gate", "width_multiple=32")["extra"]
    assert extra.count("--gate_width_multiple") == 1 and extra[extra.index("--gate_width_multiple") + 1] == "32"
    args = parse(load_bench(), monkeypatch, "--gate", "teacher=runs/lora/adapter")
    assert not args.teacher_from_lora  # the user's teacher, not the LoRA reference


def test_plain_runs_the_gates_defaults_and_a_bare_option_is_a_switch(monkeypatch):
    settings = train_settings(monkeypatch, "--plain", "--learning_rate", "2e-3", teacher=None)
    runs = ["--gate_width_multiple", "64"]
    assert settings["extra"] == ["--gate_target_sparsity", "0.3", *runs] and settings["lr"] == 2e-3
    argv = ("--plain", "--teacher_from_lora", "--gate", "warm_start", "--gates_learning_rate", "5e-4")
    settings = train_settings(monkeypatch, *argv)
    assert settings["lr"] == 5e-4
    assert settings["extra"] == ["--gate_target_sparsity", "0.3", "--gate_warm_start", *runs, "--gate_teacher",
                                 "out/lora/adapter"]  # fmt: skip


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--plain", "--teacher_from_lora"], "needs a use for the teacher: --gate distill=W with W > 0"),
        (["--plain", "--teacher_from_lora", "--gate", "distill=0"], "needs a use for the teacher"),
        (["--teacher_from_lora", "--gate", "distill=1", "--lora_steps", "0"], "needs the LoRA reference run"),
        (["--lora_steps", "0"], "needs the LoRA reference run"),  # the recipe's teacher
        (["--teacher_from_lora", "--gate", "distill=1", "--gate", "teacher=x"], "name two teachers"),
    ],
)
def test_the_switch_without_its_weight_or_its_lora_run_is_refused(monkeypatch, capsys, argv, message):
    bench = load_bench()
    with pytest.raises(SystemExit) as exit_info:
        parse(bench, monkeypatch, *argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
