"""bench/adapter_table.py on a tiny model and two methods: the table is assembled from real training and evaluation
runs, a rerun resumes instead of retraining, and contaminated test items are counted and left out on request."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from launch import REPO, env, write_train_assets

pytestmark = pytest.mark.slow

BENCH = str(REPO / "bench" / "adapter_table.py")


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
            "--methods", "lora,series", "--max_steps", "2", "--batch_size", "8", "--micro_batch_size", "4",
            "--cutoff_len", "48", "--learning_rate", "1e-2", "--ds_config", str(root / "zero3_fp32.json"),
            "--data_dir", str(root / "tests"), "--max_new_tokens", "6", "--nproc", "1",
            "--output_dir", str(root / "out"), *extra]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=env(), timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_table_resume_and_decontamination(setup):
    bench(setup)
    result = json.loads((setup / "out" / "table.json").read_text())
    assert list(result["rows"]) == ["base", "lora", "series"] and result["datasets"] == ["A", "B"]
    for name in ("lora", "series"):
        row = result["rows"][name]
        assert row["steps"] == 2 and row["trainable_params"] > 0 and row["train_tokens_per_s"] > 0
    assert result["rows"]["lora"]["trainable_params"] != result["rows"]["series"]["trainable_params"]
    for row in result["rows"].values():
        a, b = row["scores"]["A"], row["scores"]["B"]
        assert (a["n"], a["contaminated"], a["clean_n"]) == (4, 2, 2)
        assert (b["n"], b["contaminated"], b["clean_n"]) == (2, 0, 2)
        assert b["clean_accuracy"] == b["accuracy"]
        assert row["average"] == pytest.approx((a["accuracy"] + b["accuracy"]) / 2, abs=0.01)
    table = (setup / "out" / "table.md").read_text()
    assert table.splitlines()[0].startswith("| model | A | B | average |") and "(clean)" not in table

    adapter = setup / "out" / "lora" / "train" / "adapter" / "adapter_model.safetensors"
    stamp = adapter.stat().st_mtime_ns
    again = bench(setup, "--decontaminate", "--reference", "llm-adapters-llama7b")
    assert adapter.stat().st_mtime_ns == stamp  # a finished method is not retrained
    table = (setup / "out" / "table.md").read_text()
    assert "| A (clean) | B (clean) | average (clean) |" in table.splitlines()[0]
    assert "Published (LLM-Adapters README" in table and "| lora | 37.5 | 18.9 | 79.0 | 52.1 | 46.9 |" in table
    assert json.loads(again.stdout.strip().splitlines()[-1])["rows"] == result["rows"]
