"""bench/adapter_table.py on a tiny model and every registered method: the table is assembled from real training and
evaluation runs (the adapters scored in one launch on one loaded base), every cell carries its interval and every
method its paired comparison to the base and to LoRA, a rerun resumes instead of retraining, and contaminated test
items are counted and left out on request."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from launch import REPO, env, write_train_assets

from adapters_ds.adapters.registry import METHODS
from adapters_ds.demo.problems import default_splits

pytestmark = pytest.mark.slow

BENCH = str(REPO / "bench" / "adapter_table.py")
BUILTIN_N = len(default_splits(seed=0)[1])  # builtin is scored whole whatever --limit says (200 questions)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = write_train_assets(tmp_path_factory.mktemp("table"))
    training = json.loads((root / "data.json").read_text())
    data_dir = root / "tests"
    # set A: two questions of the training file and two new ones; set B: new questions only
    seen = [{"instruction": r["instruction"], "input": "", "output": "", "answer": r["output"].split("= ")[1][:-1]}
            for r in training[:2]]  # fmt: skip
    new = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": "", "answer": str(a + b)}
           for a, b in ((11, 12), (13, 14), (15, 16), (17, 18))]  # fmt: skip
    for name, records in (("A", seen + new[:2]), ("B", new[2:])):
        (data_dir / name).mkdir(parents=True)
        (data_dir / name / "test.json").write_text(json.dumps(records))
    return root


def bench(root, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, BENCH, "--base_model", str(root / "base"), "--data_path", str(root / "data.json"),
            "--max_steps", "2", "--datasets", "A,B,builtin", "--limit", "8",
            "--batch_size", "8", "--micro_batch_size", "4",
            "--cutoff_len", "48", "--learning_rate", "1e-2", "--ds_config", str(root / "zero3_fp32.json"),
            "--data_dir", str(root / "tests"), "--max_new_tokens", "6", "--nproc", "1",
            "--output_dir", str(root / "out"), *extra]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=env(), timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_table_resume_and_decontamination(setup):
    bench(setup)
    result = json.loads((setup / "out" / "table.json").read_text())
    methods = sorted(METHODS)
    assert list(result["rows"]) == ["base", *methods] and result["datasets"] == ["A", "B", "builtin"]
    for name in methods:
        row = result["rows"][name]
        assert row["steps"] == 2 and row["trainable_params"] > 0 and row["train_tokens_per_s"] > 0
        assert row["learning_rate"] == 1e-2
    assert result["rows"]["lora"]["trainable_params"] != result["rows"]["series"]["trainable_params"]
    base = result["rows"]["base"]
    for name, row in result["rows"].items():
        for d in result["datasets"]:
            score = row["scores"][d]
            lo, hi = score["ci95"]
            assert 0 <= lo <= score["accuracy"] <= hi <= 100 and score["n"] == {"A": 4, "B": 2, "builtin": BUILTIN_N}[d]
            if name == "base":
                assert "vs_base" not in row and "vs_lora" not in row
                continue
            for key, other in (("vs_base", base), ("vs_lora", result["rows"]["lora"])):
                if key == "vs_lora" and name == "lora":
                    assert key not in row
                    continue
                diff = row[key][d]
                assert diff["delta"] == pytest.approx(score["accuracy"] - other["scores"][d]["accuracy"], abs=0.01)
                assert diff["ci95"][0] <= diff["delta"] <= diff["ci95"][1] and 0 < diff["p_value"] <= 1
                assert diff["n"] == score["n"] and diff["significant"] == (diff["p_value"] < 0.05)
    assert "exact McNemar" in result["statistics"]["p_value"]
    for row in result["rows"].values():
        a, b = row["scores"]["A"], row["scores"]["B"]
        assert (a["n"], a["contaminated"], a["clean_n"]) == (4, 2, 2)
        assert (b["n"], b["contaminated"], b["clean_n"]) == (2, 0, 2)
        assert b["clean_accuracy"] == b["accuracy"]
        assert row["average"] == pytest.approx(
            (a["accuracy"] + b["accuracy"] + row["scores"]["builtin"]["accuracy"]) / 3, abs=0.01
        )
    table = (setup / "out" / "table.md").read_text()
    assert table.splitlines()[0].startswith("| model | A | B | builtin | average |") and "(clean)" not in table
    lora_a = result["rows"]["lora"]["scores"]["A"]
    assert f"| lora | {lora_a['accuracy']:.1f} [{lora_a['ci95'][0]:.1f}, {lora_a['ci95'][1]:.1f}] " in table
    assert "† marks a difference that is not significant" in table

    adapter = setup / "out" / "lora" / "train" / "adapter" / "adapter_model.safetensors"
    stamp = adapter.stat().st_mtime_ns
    again = bench(setup, "--decontaminate", "--reference", "llm-adapters-llama7b")
    assert adapter.stat().st_mtime_ns == stamp  # a finished method is not retrained
    table = (setup / "out" / "table.md").read_text()
    assert "| A (clean) | B (clean) | builtin (clean) | average (clean) |" in table.splitlines()[0]
    assert "Published (LLM-Adapters README" in table and "| lora | 37.5 | 18.9 | 79.0 | 52.1 | 46.9 |" in table
    assert json.loads(again.stdout.strip().splitlines()[-1])["rows"] == result["rows"]
