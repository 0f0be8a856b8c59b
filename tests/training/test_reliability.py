"""Reliability: bad input, unsafe files, non-finite losses, a save killed half-way, a rank killed mid-step.

- Bad input across train, evaluate and export, one table: each case exits 2 with a one-line `error: ...` as the
  last line of stderr, no traceback, and the files that were there before are unchanged (nothing written, nothing
  destroyed, even with --overwrite_output_dir). The commands run in this process, as their launchers run them.
- Non-finite loss: a real one-process DeepSpeed engine (gloo) whose logits a forward hook turns to NaN, as a
  diverged model's would. The step is skipped with the adapter weights bit-identical and the optimizer untouched,
  and K such steps in a row stop the run with exit code 2, keeping the checkpoints.
- A save killed after DeepSpeed wrote its files is skipped on resume with a warning; `latest` still names the
  previous checkpoint.
- (slow) A rank SIGKILLed mid-step: the other rank fails within 60 s by itself (no launcher to kill it), and
  `--resume auto` ends on the adapter of an uninterrupted run.
- (slow) Clean exits: a short 2-rank ZeRO-3 training, run repeatedly under the `deepspeed` launcher and as plain
  processes (srun's way): every rank of every run exits 0 within 10 s of the adapter being written.

The evaluation harness's resume after a kill is tested in test_evaluation.py
(test_resume_after_kill_generates_only_the_missing_rows).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from launch import REPO, command, env, losses, run, start_ranks, write_train_assets
from safetensors.torch import load_file
from tiny_models import make_model
from transformers import T5Config

from adapters_ds import LoRAConfig, SeriesConfig, adapter_parameters, inject_adapters, save_adapter
from adapters_ds.adapters.storage import WEIGHTS_NAME
from adapters_ds.cli import evaluate as evaluate_cli
from adapters_ds.cli import export as export_cli
from adapters_ds.cli import train as train_cli
from adapters_ds.errors import InputError, run_main
from adapters_ds.modeling import load_base_model
from adapters_ds.training import trainer
from adapters_ds.training.args import parse_train_args
from adapters_ds.training.checkpoint import MARKER, resolve_resume
from adapters_ds.zero import gathered

UNWRITABLE = Path("/proc/1/adapters_ds_out")  # procfs refuses new entries, also to root (chmod does not stop root)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Training assets (see launch.write_train_assets), an evaluation data set and three saved adapters."""
    root = write_train_assets(tmp_path_factory.mktemp("reliability"))
    (root / "eval" / "Arith").mkdir(parents=True)
    records = [{"instruction": "What is 2 plus 3?", "input": "", "answer": "5"}]
    (root / "eval" / "Arith" / "test.json").write_text(json.dumps(records))
    for name, family, config in (
        ("lora", "llama", LoRAConfig(r=2, alpha=4)),
        ("series", "llama", SeriesConfig(bottleneck_size=4)),
        ("gpt2_lora", "gpt2", LoRAConfig(r=2, alpha=4)),
    ):
        model = make_model(family)
        inject_adapters(model, config)
        save_adapter(model, config, root / name)
    return root


@pytest.fixture
def in_process():
    """The trainer, run in this process, sets RANK/MASTER_PORT (a child process inheriting them would try to join
    this process's group) and its SIGTERM/SIGUSR1 handlers: both are put back afterwards."""
    environ = dict(os.environ)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    os.environ.clear()
    os.environ.update(environ)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------------------ bad input


def snapshot(path: Path) -> dict[str, str] | None:
    """Every file and folder under `path` with a hash of each file's contents; None when nothing is there."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
        for p in sorted(path.rglob("*"))
    }


def write(path: Path, content: str | bytes | object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def busy(tmp: Path) -> Path:
    """An output folder holding earlier work."""
    write(tmp / "out" / "keep.txt", "precious")
    write(tmp / "out" / "adapter" / WEIGHTS_NAME, b"earlier adapter")
    return tmp / "out"


def copy_base(a: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(a / "base", tmp / "base"))


def train(a: Path, out: Path, *extra: str, data: Path | None = None, base: Path | None = None) -> list[str]:
    return [
        "--base_model", str(base or a / "base"), "--data_path", str(data or a / "data.json"),
        "--output_dir", str(out), "--ds_config", str(a / "zero2_fp32.json"), "--cutoff_len", "48",
        "--micro_batch_size", "4", "--batch_size", "8", "--max_steps", "1", "--lora_r", "4", "--lora_alpha", "8",
        *extra,
    ]  # fmt: skip


def without(argv: list[str], option: str) -> list[str]:
    """`argv` less `option` and its value."""
    i = argv.index(option)
    return argv[:i] + argv[i + 2 :]


def overwrite(a: Path, tmp: Path, *extra: str, **kw) -> list[str]:
    """Bad input with --overwrite_output_dir over earlier work: that work must survive."""
    return train(a, busy(tmp), "--overwrite_output_dir", *extra, **kw)


def ds_config(a: Path, tmp: Path, change: Callable[[dict], None]) -> Path:
    config = json.loads((a / "zero2_fp32.json").read_text())
    change(config)
    return write(tmp / "ds.json", config)


def evaluate(a: Path, out: Path, *extra: str, data_dir: Path | None = None, base: Path | None = None) -> list[str]:
    return [
        "--base_model", str(base or a / "base"), "--datasets", "Arith", "--data_dir", str(data_dir or a / "eval"),
        "--output_dir", str(out), "--max_new_tokens", "2", "--dtype", "float32", *extra,
    ]  # fmt: skip


def export_(a: Path, out: Path, adapter: Path, *extra: str, base: Path | None = None) -> list[str]:
    return ["--base_model", str(base or a / "base"), "--adapter_dir", str(adapter), "--output_dir", str(out), *extra]


def corrupt_adapter(a: Path, tmp: Path) -> Path:
    folder = Path(shutil.copytree(a / "lora", tmp / "adapter"))
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])  # what a copy cut short leaves
    return folder


def corrupt_base(a: Path, tmp: Path) -> Path:
    base = copy_base(a, tmp)
    (base / "model.safetensors").write_bytes(b"\x00" * 64)
    return base


def pickle_base(a: Path, tmp: Path) -> Path:
    base = copy_base(a, tmp)
    state = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    torch.save(state, base / "pytorch_model.bin")
    return base


def t5_base(a: Path, tmp: Path) -> Path:
    """An encoder-decoder: transformers has no causal-LM class for it."""
    base = tmp / "t5"
    T5Config(vocab_size=512, d_model=32, d_ff=48, num_layers=1, num_heads=4, d_kv=8).save_pretrained(base)
    for file in (a / "base").iterdir():
        if "token" in file.name:
            shutil.copy(file, base)
    return base


def remote_code_base(a: Path, tmp: Path) -> Path:
    """A model whose config needs code from its folder; the code, if ever run, leaves a file behind."""
    base = copy_base(a, tmp)
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="evil_lm", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    write(base / "config.json", config)
    write(base / "configuration_evil.py", f"open({str(tmp / 'code_ran')!r}, 'w').close()\n")
    return base


def foreign_checkpoint(tmp: Path, where: Path, world_size: int = 1, **layout: int) -> Path:
    write(where / "checkpoints" / "step-2" / MARKER, {"step": 2, "world_size": world_size, **layout})
    return where / "checkpoints" / "step-2"


def eval_data(a: Path, tmp: Path, records: object | None = None) -> Path:
    root = Path(shutil.copytree(a / "eval", tmp / "eval"))
    folder(root / "Empty")
    if records is not None:
        write(root / "Arith" / "test.json", records)
    return root


RECORD = {"instruction": "What is 1 plus 1?", "input": "", "output": "2"}
CHAT = {"messages": [{"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": "2"}]}

# (command, build(assets, case folder) -> argv, fragment of the error line); the output path is always inside the
# case folder or UNWRITABLE
CASES = [
    # ---- train
    pytest.param("train", lambda a, t: overwrite(a, t, data=write(t / "d.json", "this is not JSON\n")),
                 "invalid JSON", id="train-data-not-json"),
    pytest.param("train", lambda a, t: overwrite(a, t, data=write(t / "d.json", [{"instruction": "x", "input": ""}])),
                 "expected field 'output'", id="train-record-missing-field"),
    pytest.param("train", lambda a, t: overwrite(a, t, data=write(t / "d.json", [{**RECORD, "output": 7}])),
                 "expected field 'output' to be a string; found number", id="train-field-wrong-type"),
    pytest.param("train", lambda a, t: overwrite(a, t, data=write(t / "d.json", [])),
                 "empty dataset", id="train-empty-dataset"),
    pytest.param("train", lambda a, t: overwrite(a, t, data=write(t / "d.json", [CHAT, {"messages": [
                     CHAT["messages"][0]]}])),
                 "d.json: record 1 (0-based): expected the conversation to end with an assistant turn",
                 id="train-conversation-without-assistant-ending"),
    pytest.param("train", lambda a, t: overwrite(a, t, data=write(t / "d.json", [CHAT, {"messages": [
                     {"role": "user", "content": "x"}, {"role": "tool", "content": "3"}, *CHAT["messages"][1:]]}])),
                 "d.json: record 1 (0-based): message 1: expected a tool result after an assistant tool call",
                 id="train-conversation-tool-result-without-call"),
    pytest.param("train", lambda a, t: overwrite(a, t, data=write(t / "d.json", [CHAT, {"messages": [
                     {"role": "robot", "content": "x"}, *CHAT["messages"][1:]]}])),
                 "d.json: record 1 (0-based): message 0: expected a role among system, user, assistant, tool; found "
                 "'robot'", id="train-conversation-unknown-role"),
    pytest.param("train", lambda a, t: overwrite(a, t, data=write(t / "d.json", [CHAT, {"text": "x"}])),
                 "d.json: record 1 (0-based): expected 'messages' (OpenAI), 'conversations' (ShareGPT) or",
                 id="train-record-of-no-known-format"),
    pytest.param("train", lambda a, t: overwrite(a, t, "--chat_template", str(t / "none.jinja")),
                 "chat_template: expected a Jinja template file; found no file", id="train-chat-template-missing"),
    pytest.param("train", lambda a, t: overwrite(a, t, "--config", str(write(t / "r.yaml", "lerning_rate: 1\n"))),
                 "r.yaml': unknown option 'lerning_rate'", id="train-config-unknown-key"),
    pytest.param("train", lambda a, t: overwrite(a, t, "--cutoff_len", "4"),
                 "every prompt is longer than cutoff_len=4", id="train-every-prompt-beyond-cutoff"),
    pytest.param("train", lambda a, t: overwrite(a, t, "--target_modules", "q_proj,nope_proj"),
                 "['nope_proj'] matched no module", id="train-target-modules-match-nothing"),
    pytest.param("train", lambda a, t: overwrite(a, t, "--adapter", "adapterx"),
                 "invalid choice: 'adapterx'", id="train-unknown-adapter"),
    pytest.param("train", lambda a, t: overwrite(a, t, "--ds_config", str(ds_config(
                     a, t, lambda c: c["zero_optimization"].update(bogus_key=1)))),
                 "bogus_key", id="train-ds-config-unknown-key"),
    pytest.param("train", lambda a, t: overwrite(a, t, "--ds_config", str(ds_config(
                     a, t, lambda c: c.update(optimizer={"type": "AdamWW", "params": {}})))),
                 "optimizer type 'AdamWW' is neither", id="train-ds-config-unknown-optimizer"),
    pytest.param("train", lambda a, t: overwrite(a, t, "--ds_config", str(write(t / "ds.json", "{'stage': 3}"))),
                 "is not valid JSON", id="train-ds-config-not-json"),
    pytest.param("train", lambda a, t: overwrite(a, t, "--ds_config", str(ds_config(
                     a, t, lambda c: c.update(train_micro_batch_size_per_gpu=8)))),
                 "train_micro_batch_size_per_gpu=8 conflicts with --micro_batch_size 4",
                 id="train-conflicting-batch-sizes"),
    pytest.param("train", lambda a, t: overwrite(a, t, "--batch_size", "6"),
                 "--batch_size 6 must be a multiple of --micro_batch_size 4", id="train-batch-size-not-a-multiple"),
    pytest.param("train", lambda a, t: overwrite(a, t, base=t / "no_model"),
                 "base model not found", id="train-missing-base-model"),
    pytest.param("train", lambda a, t: overwrite(a, t, base=t5_base(a, t)),
                 "is a 't5' model, which transformers has no causal language model class for",
                 id="train-wrong-architecture"),
    pytest.param("train", lambda a, t: overwrite(a, t, base=corrupt_base(a, t)),
                 "cannot load base model", id="train-corrupt-base-weights"),
    pytest.param("train", lambda a, t: overwrite(a, t, base=pickle_base(a, t)),
                 "pickle weights only (pytorch_model.bin)", id="train-pickle-base-weights"),
    pytest.param("train", lambda a, t: overwrite(a, t, base=remote_code_base(a, t)),
                 "trust_remote_code", id="train-remote-code"),
    pytest.param("train", lambda a, t: train(a, write(t / "out.txt", "a file")),
                 "exists and is not a directory", id="train-output-is-a-file"),
    pytest.param("train", lambda a, t: train(a, write(t / "out.txt", "a file") / "run"),
                 "is a file, not a folder", id="train-output-under-a-file"),
    pytest.param("train", lambda a, t: train(a, UNWRITABLE),
                 "is not writable", id="train-output-unwritable"),
    pytest.param("train", lambda a, t: train(a, busy(t)),
                 "is not empty; pass --resume auto", id="train-output-not-empty"),
    pytest.param("train", lambda a, t: overwrite(a, t, "--resume", str(t / "out")),
                 "no complete checkpoint there", id="train-resume-without-checkpoint"),
    pytest.param("train", lambda a, t: overwrite(a, t, "--resume", str(foreign_checkpoint(t, t / "elsewhere"))),
                 "outside --output_dir", id="train-resume-pickles-from-elsewhere"),
    pytest.param("train", lambda a, t: train(a, foreign_checkpoint(t, t / "out", world_size=2).parents[1], "--resume",
                                             "auto"),
                 "was written by 2 rank(s) without the consolidated optimizer state",
                 id="train-resume-other-world-size-without-consolidated-state"),
    pytest.param("train", lambda a, t: train(a, foreign_checkpoint(t, t / "out", batch_size=16).parents[1], "--resume",
                                             "auto"),
                 "global batch of 16 examples per step; this run has 8: resume with --batch_size 16",
                 id="train-resume-other-global-batch"),
    pytest.param("train", lambda a, t: overwrite(a, t, data=t / "none.json"),
                 "found no file", id="train-data-file-missing"),
    pytest.param("train", lambda a, t: overwrite(a, t, data=write(t / "d.json", [RECORD] * 6)),
                 "fewer than one step of --batch_size 8", id="train-fewer-examples-than-a-step"),
    pytest.param("train", lambda a, t: overwrite(a, t, "--val_set_size", "500"),
                 "val_set_size: expected fewer validation examples", id="train-validation-set-too-large"),
    pytest.param("train", lambda a, t: overwrite(a, t, "--lora_r", "0"),
                 "lora r must be a positive integer", id="train-bad-hyperparameter"),
    pytest.param("train", lambda a, t: overwrite(a, t, "--max_nonfinite_steps", "0"),
                 "--max_nonfinite_steps must be >= 1", id="train-max-nonfinite-steps-zero"),
    pytest.param("train", lambda a, t: without(overwrite(a, t), "--data_path"),
                 "--base_model needs --data_path too (the built-in demo runs only when neither is given)",
                 id="train-model-without-data"),
    pytest.param("train", lambda a, t: without(overwrite(a, t), "--base_model"),
                 "--data_path needs --base_model too", id="train-data-without-model"),
    pytest.param("train", lambda a, t: without(without(overwrite(a, t, "--adapter", "prefix", "--attn_implementation",
                                                                 "eager"), "--lora_r"), "--lora_alpha"),
                 "--adapter prefix runs its own attention and cannot honour --attn_implementation eager",
                 id="train-attention-a-method-cannot-honour"),
    pytest.param("train", lambda a, t: overwrite(a, t, "--bottleneck_size", "8"),
                 "--bottleneck_size does not apply to --adapter lora", id="train-option-of-another-method"),
    # ---- evaluate
    pytest.param("evaluate", lambda a, t: evaluate(a, busy(t), "--datasets", "Empty", data_dir=eval_data(a, t)),
                 "test.json", id="evaluate-dataset-without-test-json"),
    pytest.param("evaluate", lambda a, t: evaluate(a, busy(t), "--datasets", "Nope"),
                 "dataset 'Nope': no folder", id="evaluate-unknown-dataset"),
    pytest.param("evaluate", lambda a, t: evaluate(a, busy(t), "--adapter_dir", str(a / "gpt2_lora")),
                 "was trained on a 'gpt2' model", id="evaluate-adapter-from-another-base"),
    pytest.param("evaluate", lambda a, t: evaluate(a, busy(t), "--adapter_dir", str(corrupt_adapter(a, t))),
                 "are corrupt or unreadable", id="evaluate-corrupt-adapter-weights"),
    pytest.param("evaluate", lambda a, t: evaluate(a, busy(t), "--adapter_dir", str(folder(t / "a"))),
                 "adapter config not found", id="evaluate-adapter-folder-empty"),
    pytest.param("evaluate", lambda a, t: evaluate(a, busy(t), data_dir=eval_data(
                     a, t, [{"instruction": "1 + 1", "answer": "two"}])),
                 "record 0", id="evaluate-answer-of-the-wrong-kind"),
    pytest.param("evaluate", lambda a, t: evaluate(a, write(t / "out.txt", "a file")),
                 "exists and is not a directory", id="evaluate-output-is-a-file"),
    pytest.param("evaluate", lambda a, t: evaluate(a, busy(t), base=pickle_base(a, t)),
                 "pickle weights only", id="evaluate-pickle-base-weights"),
    pytest.param("evaluate", lambda a, t: evaluate(a, busy(t), base=t / "no_model"),
                 "base model not found", id="evaluate-missing-base-model"),
    # ---- export
    pytest.param("export", lambda a, t: export_(a, t / "out", corrupt_adapter(a, t), "--peft"),
                 "are corrupt or unreadable", id="export-corrupt-adapter-weights"),
    pytest.param("export", lambda a, t: export_(a, t / "out", a / "gpt2_lora", "--merge"),
                 "was trained on a 'gpt2' model", id="export-adapter-from-another-base"),
    pytest.param("export", lambda a, t: export_(a, t / "out", a / "series", "--peft"),
                 "have no Hugging Face PEFT format", id="export-peft-of-a-series-adapter"),
    pytest.param("export", lambda a, t: export_(a, busy(t), a / "lora", "--peft"),
                 "is not empty; pass --overwrite", id="export-output-not-empty"),
    pytest.param("export", lambda a, t: export_(a, write(t / "out.txt", "a file") / "x", a / "lora", "--peft"),
                 "is a file, not a folder", id="export-output-under-a-file"),
    pytest.param("export", lambda a, t: export_(a, UNWRITABLE, a / "lora", "--merge"),
                 "is not writable", id="export-output-unwritable"),
    pytest.param("export", lambda a, t: export_(a, busy(t), a / "lora", "--peft", "--overwrite", base=t / "none"),
                 "base model not found", id="export-missing-base-model"),
]  # fmt: skip

MAINS = {
    "train": train_cli.main,  # as launcher/train.py runs it
    "evaluate": evaluate_cli.main,
    "export": export_cli.main,
}


@pytest.mark.parametrize("command,build,fragment", CASES)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    assets, tmp_path, in_process, capsys, command, build, fragment
):
    argv = build(assets, tmp_path)
    before = snapshot(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        MAINS[command](argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exc.value.code == 2, err
    assert "Traceback" not in err and lines[-1].startswith("error: "), err
    assert fragment in lines[-1], lines[-1]
    assert snapshot(tmp_path) == before  # nothing written, nothing destroyed
    assert not UNWRITABLE.exists()
    assert not (tmp_path / "code_ran").exists()  # a model folder's code never ran


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25 and {p.values[0] for p in CASES} == {"train", "evaluate", "export"}


# ---------------------------------------------------------------------------------------------------- safe loading


def test_pickle_weights_load_only_when_allowed(assets, tmp_path):
    base = pickle_base(assets, tmp_path)
    with pytest.raises(InputError, match="pickle weights only"):
        load_base_model(str(base), dtype=torch.float32)
    model = load_base_model(str(base), dtype=torch.float32, allow_pickle=True)
    reference = load_base_model(str(assets / "base"), dtype=torch.float32)
    ids = torch.arange(3, 15).unsqueeze(0)
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------- non-finite loss, saves


class NaNLogits:
    """A forward hook on the final norm (the LM head's input): the logits of the forward calls numbered in `calls`
    become NaN, whether the loss runs the head on every position or in chunks over the target positions."""

    def __init__(self, model: torch.nn.Module, calls: set[int] | None = None) -> None:
        self.calls, self.count = set(calls or ()), 0
        model.get_decoder().norm.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.count += 1
        return output * math.nan if self.count - 1 in self.calls else None


def make_trainer(a: Path, out: Path, ds: str, *extra: str) -> trainer.Trainer:
    argv = train(a, out, "--ds_config", ds, "--lora_dropout", "0", "--learning_rate", "2e-2", "--lr_scheduler",
                 "constant", "--logging_steps", "1", *extra)  # fmt: skip
    args = parse_train_args(argv)
    return trainer.Trainer(args, args.base_model)


def adapter_state(t: trainer.Trainer) -> dict[str, torch.Tensor]:
    # gathered: ZeRO-3 partitions even its persistent (replicated) parameters when it drops a step
    params = adapter_parameters(t.engine.module)
    with gathered(params.values()):
        return {name: p.detach().clone() for name, p in params.items()}


# ZeRO-3 and ZeRO-2 drop the step on DeepSpeed's overflow path; without ZeRO the engine steps a plain optimizer
NONFINITE_CONFIGS = ["zero3_fp32.json", "zero2_fp32.json", str(REPO / "ds_configs" / "zero2.json"), "nozero_fp32.json"]


@pytest.mark.parametrize("ds", NONFINITE_CONFIGS, ids=["zero3-fp32", "zero2-fp32", "zero2-bf16-auto", "no-zero-fp32"])
def test_a_nonfinite_step_is_skipped_and_leaves_weights_and_optimizer_untouched(assets, tmp_path, in_process, ds):
    ds = ds if os.path.isabs(ds) else str(assets / ds)
    poisoned = make_trainer(assets, tmp_path / "poisoned", ds, "--max_steps", "3")
    NaNLogits(poisoned.engine.module, calls={2})  # 2 micro-batches a step: step 1's first, not the boundary one
    assert not poisoned.train_step(0)["skipped"]
    before = adapter_state(poisoned)
    result = poisoned.train_step(1)
    assert result["skipped"] and not math.isfinite(result["loss"])
    after = adapter_state(poisoned)
    assert all(torch.equal(before[name], after[name]) for name in before)  # bit-identical
    assert not poisoned.train_step(2)["skipped"]
    final = adapter_state(poisoned)
    assert all(torch.isfinite(t).all() for t in final.values()) and any(
        not torch.equal(before[name], final[name]) for name in before
    )
    # the same steps without the poisoned one: equal only if the skip left Adam's moments and step count alone
    reference = make_trainer(assets, tmp_path / "reference", ds, "--max_steps", "3")
    reference.train_step(0)
    reference.train_step(2)
    expected = adapter_state(reference)
    assert all(torch.equal(expected[name], final[name]) for name in final)


def test_nonfinite_steps_in_a_row_stop_the_run_then_resume_skips_a_killed_save(
    assets, tmp_path, in_process, capsys, caplog
):
    out = tmp_path / "out"
    extra = ("--max_steps", "8", "--save_steps", "2", "--save_total_limit", "0", "--max_nonfinite_steps", "2")
    first = make_trainer(assets, out, str(assets / "zero3_fp32.json"), *extra)
    NaNLogits(first.engine.module, calls={6, 11, 12})  # two forwards a step: in steps 4, 6 and 7
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main(first.fit)
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    root = out / "checkpoints"
    assert last == (
        f"error: the loss was not finite in 2 steps in a row (steps 6 to 7); stopped without saving (the last "
        f"complete checkpoint, {str(root / 'step-6')!r}, is kept): lower --learning_rate, check the data, or raise "
        "--max_nonfinite_steps"
    )
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log if entry.get("skipped")] == [4, 6, 7]
    assert all(math.isfinite(entry["loss"]) for entry in log if not entry.get("skipped"))
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-2", "step-4", "step-6"]
    assert not (out / "adapter").exists()
    # steps 6 and 7 were skipped: the weights now are those of checkpoint 6, saved after step 5
    saved = load_file(root / "step-6" / "adapter" / WEIGHTS_NAME)
    assert all(torch.equal(saved[name], value) for name, value in adapter_state(first).items())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard" / "train"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/nonfinite_steps")] == [(4, 1), (6, 2), (7, 3)]

    # a save of step 8 killed after DeepSpeed wrote its files leaves this (the real engine writes it)
    first.engine.save_checkpoint(str(root), tag=".step-8.partial", save_latest=False, exclude_frozen_parameters=True)
    assert (root / "latest").read_text() == "step-6"
    with caplog.at_level(logging.WARNING, logger="adapters_ds.training.checkpoint"):
        resumed = make_trainer(assets, out, str(assets / "zero3_fp32.json"), *extra, "--resume", "auto")
    assert resumed.resume_from == root / "step-6"
    assert any(".step-8.partial" in r.getMessage() and "step-6" in r.getMessage() for r in caplog.records)
    resumed.fit()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-2", "step-4", "step-6", "step-8"]
    assert (root / "latest").read_text() == "step-8" and (out / "adapter" / WEIGHTS_NAME).is_file()
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == list(
        range(1, 9)
    )


def test_partial_checkpoints_are_skipped_with_a_warning(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    write(root / "step-2" / MARKER, {"step": 2, "world_size": 1})
    write(root / "step-4" / "mp_rank_00_model_states.pt", b"cut short")  # saved in place, marker never written
    write(root / ".step-6.partial" / "mp_rank_00_model_states.pt", b"cut short")
    with caplog.at_level(logging.WARNING, logger="adapters_ds.training.checkpoint"):
        assert resolve_resume("auto", tmp_path) == root / "step-2"
        assert resolve_resume(str(tmp_path), "elsewhere") == root / "step-2"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("'step-4'" in w and "'.step-6.partial'" in w for w in warnings)
    caplog.clear()
    shutil.rmtree(root / "step-2")
    with caplog.at_level(logging.WARNING, logger="adapters_ds.training.checkpoint"):
        assert resolve_resume("auto", tmp_path) is None  # nothing complete yet: start from the beginning
        with pytest.raises(InputError, match="no complete checkpoint there"):
            resolve_resume(str(root), "elsewhere")
    assert "resuming from the start" in caplog.records[0].getMessage()


# ---------------------------------------------------------------------------------------------- a rank killed


def signal_rank_1(argv: list[str], out, tmp_path, after_lines: int, sig: signal.Signals) -> tuple[int, float, str]:
    """Start 2 ranks as plain processes, send `sig` to rank 1 once the run logged `after_lines` steps, and wait for
    rank 0: (its exit code, seconds from the signal to its exit, its log)."""
    ranks = start_ranks(argv, log_dir=tmp_path)
    try:
        deadline = time.monotonic() + 600
        while len(read_lines(out / "train_log.jsonl")) < after_lines:
            assert ranks[0].poll() is None and time.monotonic() < deadline, (tmp_path / "rank0.log").read_text()
            time.sleep(0.02)
        os.kill(ranks[1].pid, sig)
        sent_at = time.monotonic()
        code = ranks[0].wait(timeout=120)
        elapsed = time.monotonic() - sent_at
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()  # also ends a stopped process
                proc.wait()
    return code, elapsed, (tmp_path / "rank0.log").read_text()


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_within_60_s_and_resume_matches_an_uninterrupted_run(assets, tmp_path):
    def args(out: Path) -> list[str]:
        return train(assets, out, "--ds_config", "ds_configs/zero3.json", "--max_steps", "16", "--save_steps", "4",
                     "--lora_dropout", "0.1", "--learning_rate", "2e-2", "--logging_steps", "4")  # fmt: skip

    reference = tmp_path / "reference"
    run(args(reference))

    out = tmp_path / "killed"
    code, elapsed, rank0 = signal_rank_1(args(out), out, tmp_path, 6, signal.SIGKILL)  # past step 4's checkpoint
    assert code not in (0, None) and elapsed < 60, (code, elapsed, rank0[-3000:])
    assert len(losses(reference)) == 16
    done = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*") if (p / MARKER).is_file()]
    assert 4 in done and max(done) < 16, done

    run([*args(out), "--resume", "auto"])
    assert losses(out) == pytest.approx(losses(reference), abs=1e-6)
    resumed, expected = load_file(out / "adapter" / WEIGHTS_NAME), load_file(reference / "adapter" / WEIGHTS_NAME)
    for name in expected:
        torch.testing.assert_close(resumed[name].float(), expected[name].float(), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_a_hung_rank_fails_the_run_after_the_collective_timeout(assets, tmp_path):
    """A stopped rank (a frozen node) closes no connection: only the collective timeout ends the wait."""
    out = tmp_path / "hung"
    argv = train(assets, out, "--ds_config", "ds_configs/zero3.json", "--max_steps", "1000", "--dist_timeout", "10")
    code, elapsed, rank0 = signal_rank_1(argv, out, tmp_path, 2, signal.SIGSTOP)
    assert code not in (0, None) and elapsed < 60 and "timed out" in rank0.lower(), (code, elapsed, rank0[-3000:])


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


# ---------------------------------------------------------------------------------------------- clean exits

ENDING = """
import sys
from adapters_ds.distributed import closing_distributed, init_distributed
with closing_distributed(exit_process=True):
    init_distributed()
    print("before the end")  # left in the buffer: the exit path flushes it
    {ending}
print("after the block")
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ending", "code", "message"),
    [("sys.exit(75)", 75, ""), ("raise RuntimeError('boom')", 1, "RuntimeError: boom")],
    ids=["checkpoint-and-stop", "crash"],
)
def test_a_command_that_is_its_process_exits_with_its_own_code_after_ending_its_process_group(ending, code, message):
    result = subprocess.run(
        [sys.executable, "-c", ENDING.format(ending=ending)], env=env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == code, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "before the end" and "after the block" not in result.stdout
    assert message in result.stderr
    if message:
        assert "Traceback" in result.stderr  # printed as Python prints an uncaught exception


# Runs per launcher: 3 in the suite, which keeps the suite's time in bounds; ADAPTERS_DS_EXIT_RUNS=20 for a fuller
# count (40 runs).
EXIT_RUNS = int(os.environ.get("ADAPTERS_DS_EXIT_RUNS", "3"))


def rank_states(pids: list[int]) -> list[bool]:
    """Whether each process has exited (gone, or a zombie its parent has not reaped yet)."""
    ended = []
    for pid in pids:
        try:
            ended.append(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z")
        except (FileNotFoundError, ProcessLookupError):
            ended.append(True)
    return ended


def exit_run(argv: list[str], out: Path, logs: Path, launcher: str) -> tuple[list[int], list[float], str]:
    """A 2-rank run under `launcher` ("deepspeed", or "plain": srun-style processes); (exit code of each rank,
    seconds from the adapter's writing to each rank's exit, log)."""
    logs.mkdir(parents=True)
    if launcher == "plain":
        ranks = start_ranks(argv, logs)
        log_files = [logs / f"rank{r}.log" for r in range(2)]
    else:
        with (logs / "launcher.log").open("w") as log:
            launched = subprocess.Popen(
                [*command("deepspeed", 2), *argv], env=env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT
            )
        log_files = [logs / "launcher.log"]
    text = lambda: "".join(f.read_text(errors="replace") for f in log_files if f.exists())  # noqa: E731
    ended_at: dict[int, float] = {}
    deadline = time.monotonic() + 600
    try:
        while len(ended_at) < 2:
            assert time.monotonic() < deadline, text()[-3000:]
            if launcher == "plain":
                done = [rank.poll() is not None for rank in ranks]
            else:  # the ranks are the launcher's children: their pids are in its log
                pids = [int(pid) for pid in re.findall(r"process (\d+) spawned with command", text())]
                done = rank_states(pids) if len(pids) == 2 else [launched.poll() is not None] * 2
            for r, ended in enumerate(done):
                if ended and r not in ended_at:
                    ended_at[r] = time.time()
            time.sleep(0.02)
        if launcher == "plain":
            codes = [rank.wait() for rank in ranks]
        else:
            status = launched.wait(timeout=120)
            codes = [0 if f"Process {pid} exits successfully." in text() else status or -1 for pid in pids]
    finally:
        for proc in ranks if launcher == "plain" else [launched]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    adapter = out / "adapter" / WEIGHTS_NAME
    saved = adapter.stat().st_mtime if adapter.is_file() else math.inf
    return codes, [round(ended_at[r] - saved, 2) for r in range(2)], text()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "plain"], ids=["deepspeed-launcher", "srun-style-processes"])
def test_every_rank_exits_0_within_10_s_of_writing_the_adapter(assets, tmp_path, launcher):
    """Without an explicit end, gloo's and DeepSpeed's threads outlived the command into the interpreter's
    finalization: once in a while a rank aborted there (exit 134, "terminate called without an active exception")
    after saving the adapter, and the ranks took seconds to exit."""
    table = []
    for i in range(EXIT_RUNS):
        out = tmp_path / f"run{i}"
        argv = train(assets, out, "--ds_config", str(assets / "zero3_fp32.json"), "--max_steps", "2")
        codes, seconds, log = exit_run(argv, out, tmp_path / f"logs{i}", launcher)
        table.append((codes, seconds))
        assert codes == [0, 0] and max(seconds) < 10, (i, codes, seconds, log[-4000:])
        assert "terminate called" not in log, log[-4000:]
    print(f"\n{launcher}: (exit codes, seconds from the adapter's writing to each rank's exit) per run: {table}")
