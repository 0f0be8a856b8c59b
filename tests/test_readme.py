"""The README's library example runs as printed, through the public API of `adapters_ds`, and its --preview_data
command prints what it shows."""

from __future__ import annotations

import json
import re
import shlex

import pytest
import torch
from adapters.test_plugin_method import method_example
from launch import REPO
from tiny_models import make_model
from transformers import AutoModelForCausalLM, LlamaConfig

import adapters_ds
from adapters_ds.cli.train import run as train_command
from adapters_ds.demo.default_model import default_model_dir, is_complete
from adapters_ds.training.args import adapter_config, parse_train_args
from adapters_ds.training.persistence import check_share, plan_persistence


def SMOLLM2() -> LlamaConfig:  # the embedded model's published sizes
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                       num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True)  # fmt: skip


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)


def test_the_library_example_runs_as_written(tmp_path, monkeypatch, capsys):
    (example,) = [block for block in readme_python_blocks() if "inject_adapters" in block]
    monkeypatch.chdir(tmp_path)
    model = make_model("llama")
    namespace = {"model": model}
    exec(compile(example, "README.md", "exec"), namespace)
    assert re.search(
        r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: [\d.]+", capsys.readouterr().out
    )
    # the saved adapter loads into a fresh base with the same outputs
    fresh = make_model("llama")
    adapters_ds.load_adapter(fresh, "out/adapter")
    ids = torch.arange(3, 19).unsqueeze(0)
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_the_public_api_names_exist():
    assert set(adapters_ds.__all__) <= set(dir(adapters_ds))
    assert {"lora", "series", "parallel", "gates"} <= set(adapters_ds.METHODS)


def readme_train_commands() -> list[list[str]]:
    """Every training command the README prints (in code spans or blocks), as argument lists after the script."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    found = re.findall(r"deepspeed launcher/train\.py ([^`\n]*)", text)
    return [shlex.split(line) for line in found]


@pytest.fixture
def registry_restored():
    """The method registry as it was before the test (a plugin registered here must not leak into later tests)."""
    saved = dict(adapters_ds.METHODS)
    yield
    adapters_ds.METHODS.clear()
    adapters_ds.METHODS.update(saved)


def test_every_method_trains_under_the_shipped_zero3_config_as_printed(tmp_path, monkeypatch, registry_restored):
    """The README's `--adapter` commands and every registered method with the shipped ZeRO-3 config (and the README's
    own plugin method, as a plugin): the options parse, and on the embedded model's shapes (SmolLM2-135M,
    grouped-query attention) the adapters stay whole and the base is partitioned within the limit."""
    (tmp_path / "outscale.py").write_text(method_example())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ADAPTERS_DS_METHODS", "outscale")
    commands = [argv for argv in readme_train_commands() if "--adapter" in argv]
    assert commands, "the README shows no --adapter command"
    commands += [["--ds_config", "ds_configs/zero3.json", "--adapter", name] for name in sorted(adapters_ds.METHODS)]
    for argv in commands:
        args = parse_train_args(argv)
        assert json.loads((REPO / args.ds_config).read_text())["zero_optimization"]["stage"] == 3
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(SMOLLM2())
        adapters_ds.inject_adapters(model, adapter_config(args))
        adapters_ds.freeze_base(model)
        plan = plan_persistence(model)
        check_share(plan, args.max_replicated_base_share)
        assert plan.base_replicated_share < 0.001 and plan.adapters, argv


def test_the_readme_preview_is_what_the_command_prints(tmp_path, monkeypatch, capsys):
    """The README's --preview_data command on its example records (as chat.jsonl) prints its output line."""
    if not is_complete(default_model_dir()):
        pytest.skip("the embedded model is prepared by .ci/setup")
    readme = (REPO / "README.md").read_text()
    records = readme.split("so one file may mix them:\n\n```json\n", 1)[1].split("```", 1)[0]
    (tmp_path / "chat.jsonl").write_text(re.sub(r"\n\s+", " ", records))  # one record a line
    command, printed = readme.split("--preview_data N` prints", 1)[1].split("```bash\n", 1)[1].split("\n{", 1)
    argv = shlex.split(command.replace("\\\n", " "), comments=True)[2:]  # less "python launcher/train.py"
    argv[argv.index("--base_model") + 1] = str(default_model_dir())
    argv[argv.index("--chat_template") + 1] = str(REPO / "slurm" / "recipes" / "chatml_tools.jinja")
    monkeypatch.chdir(tmp_path)
    train_command(argv)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [json.loads(line) for line in lines] == [json.loads("{" + printed.split("\n```", 1)[0])]
