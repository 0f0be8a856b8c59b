"""The README's "A method of your own": its example module, outside the package, is a method in every command. It
trains on 2 ranks under ZeRO-3 (loaded through `ADAPTERS_DS_METHODS`), evaluates in one process (loaded through an
entry point: a dist-info folder on PYTHONPATH) and with `--tensor_parallel 2` (the same rows, fp32), loads with
`adapters_ds.load_adapter` in a fresh process, reaches export and `bench/adapter_table.py`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from launch import REPO, command, env, write_train_assets

QUESTIONS = [("What is 3 plus 4?", "7"), ("What is 5 plus 2?", "7"), ("What is 8 plus 1?", "9"),
             ("What is 6 plus 6?", "12"), ("What is 2 plus 9?", "11"), ("What is 4 plus 4?", "8")]  # fmt: skip


def method_example() -> str:
    """The module between the README's method-example markers."""
    text = (REPO / "README.md").read_text()
    (block,) = re.findall(r"<!-- method-example -->\n```python\n(.*?)```\n<!-- /method-example -->", text, re.DOTALL)
    return block


def plugin_env(path, methods: str | None) -> dict[str, str]:
    """The launch environment with `path` on PYTHONPATH and `ADAPTERS_DS_METHODS` set to `methods` (or unset)."""
    variables = {k: v for k, v in env().items() if k != "ADAPTERS_DS_METHODS"}
    variables["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH")]))
    return variables | ({"ADAPTERS_DS_METHODS": methods} if methods else {})


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = write_train_assets(tmp_path_factory.mktemp("plugin"))
    (root / "modules").mkdir()
    (root / "modules" / "outscale.py").write_text(method_example())
    entry = root / "installed"  # what `pip install` of a package declaring the entry point leaves on sys.path
    (entry / "outscale_method-1.0.dist-info").mkdir(parents=True)
    (entry / "outscale_method-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: outscale-method\nVersion: 1.0\n"
    )
    (entry / "outscale_method-1.0.dist-info" / "entry_points.txt").write_text(
        "[adapters_ds.methods]\noutscale = outscale\n"
    )
    (entry / "outscale.py").write_text(method_example())
    (root / "eval" / "Arith").mkdir(parents=True)
    records = [{"instruction": q, "input": "", "output": "", "answer": a} for q, a in QUESTIONS]
    (root / "eval" / "Arith" / "test.json").write_text(json.dumps(records))
    return root


def evaluate_argv(assets, adapter, out, *extra: str) -> list[str]:
    return ["--base_model", str(assets / "base"), "--adapter_dir", str(adapter), "--datasets", "Arith",
            "--data_dir", str(assets / "eval"), "--output_dir", str(out), "--batch_size", "3",
            "--max_new_tokens", "6", "--dtype", "float32", *extra]  # fmt: skip


FRESH = """
import json, sys
import torch
import adapters_ds
from adapters_ds.cli import export
base, adapter, out = sys.argv[1:]
assert "outscale" not in adapters_ds.METHODS  # nothing has imported the plugin yet
model = adapters_ds.load_base_model(base, dtype="float32")
config = adapters_ds.load_adapter(model, adapter)  # finds the method through its entry point
ids = torch.arange(3, 19).unsqueeze(0)
with torch.no_grad():
    logits = model(input_ids=ids).logits
    base_logits = adapters_ds.load_base_model(base, dtype="float32")(input_ids=ids).logits
code = 0
try:
    export.main(["--base_model", base, "--adapter_dir", adapter, "--output_dir", out, "--peft"])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"method": config.method, "lr_ratio": config.lr_ratio, "export_exit": code,
                  "changed": float((logits - base_logits).abs().max())}))
"""

BENCH = """
import runpy, sys
bench = runpy.run_path(sys.argv[1])
args = bench["parse_args"](["--methods", "outscale", "--data_dir", sys.argv[2]])
print(args.methods)
"""


def launch(cmd: list[str], variables: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=variables, capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_the_readme_method_trains_evaluates_sharded_and_loads_in_a_fresh_process(assets, tmp_path):
    by_name, by_entry_point = plugin_env(assets / "modules", "outscale"), plugin_env(assets / "installed", None)
    out = tmp_path / "run"
    launch([*command("deepspeed", 2), "--ds_config", str(assets / "zero3_fp32.json"),
            "--base_model", str(assets / "base"), "--data_path", str(assets / "data.json"), "--output_dir", str(out),
            "--adapter", "outscale", "--outscale_lr_ratio", "10", "--max_steps", "4", "--micro_batch_size", "4",
            "--batch_size", "8", "--learning_rate", "1e-2", "--logging_steps", "1"], by_name)  # fmt: skip
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["method"] == "outscale" and config["lr_ratio"] == 10
    assert config["target_modules"] == ["v_proj", "down_proj"]  # its roles, in the LLaMA family's names
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    reports = json.loads((out / "zero3_partition.json").read_text())
    assert all(r["adapter_local_numel"] == r["adapter_numel"] > 0 for r in reports), reports  # replicated

    whole, sharded, evaluate = tmp_path / "whole", tmp_path / "sharded", str(REPO / "launcher" / "evaluate.py")
    launch([sys.executable, evaluate, *evaluate_argv(assets, adapter, whole)], by_entry_point)
    launch([*command("deepspeed", 2, evaluate), *evaluate_argv(assets, adapter, sharded, "--tensor_parallel", "2")],
           by_name)  # fmt: skip
    assert (sharded / "Arith.jsonl").read_text() == (whole / "Arith.jsonl").read_text()
    assert json.loads((sharded / "summary.json").read_text())["timing"]["tensor_parallel"] == 2
    assert len((whole / "Arith.jsonl").read_text().splitlines()) == len(QUESTIONS)

    peft = tmp_path / "peft"
    fresh = launch([sys.executable, "-c", FRESH, str(assets / "base"), str(adapter), str(peft)], by_entry_point)
    facts = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert facts["method"] == "outscale" and facts["lr_ratio"] == 10 and facts["changed"] > 0  # trained, not zero
    assert facts["export_exit"] == 2 and "outscale adapters have no Hugging Face PEFT format" in fresh.stderr
    assert not peft.exists()
    bench = launch(
        [sys.executable, "-c", BENCH, str(REPO / "bench" / "adapter_table.py"), str(assets / "eval")], by_name
    )
    assert "['outscale']" in bench.stdout
