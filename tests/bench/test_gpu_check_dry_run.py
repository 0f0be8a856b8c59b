"""bench/gpu_check.sh --dry-run: every part of the GPU check on the CPU with tiny shapes, so the one command a GPU
machine gets cannot rot while no GPU is at hand."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from launch import EXTENSIONS, REPO

PARTS = {"ops", "tests", "throughput", "mfu", "zero3_13b", "qlora_13b"}


@pytest.mark.slow
def test_the_dry_run_runs_every_part_and_reports_it(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(work), "TORCH_EXTENSIONS_DIR": str(EXTENSIONS)}
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out), "--dry-run"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=2400)  # fmt: skip
    report_path = out / "gpu_check.json"
    assert report_path.is_file(), result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    failed = {name: part.get("log_tail") for name, part in report["parts"].items() if part.get("status") != "passed"}
    assert result.returncode == 0 and report["all_passed"], (failed, result.stderr[-2000:])
    assert report["dry_run"] is True and set(report["parts"]) == PARTS
    assert all(part["ran"] and part["s"] <= part["limit_s"] for part in report["parts"].values())
    assert (out / "logs" / "setup.log").is_file() and all((out / "logs" / f"{p}.log").is_file() for p in PARTS)
    # what each part measured made it into the report
    parts = report["parts"]
    assert parts["ops"]["result"]["ops"]["cpu_adam"]["ok"]
    tests = parts["tests"]["counts"]
    assert tests["failed"] == tests["error"] == 0 and tests["passed"] >= 5, parts["tests"]["cases"]
    assert parts["throughput"]["result"]["modes"]["b"]["target_tokens_per_s"] > 0
    assert parts["mfu"]["result"]["mfu"] > 0 and parts["mfu"]["result"]["attn_implementation"]
    zero3 = parts["zero3_13b"]["result"]["runs"]["zero3_offload_1rank"][0]
    assert zero3["base_numel"] > 0 and zero3["world_size"] == 1
    qlora = parts["qlora_13b"]["result"]["runs"]["zero3+nf4_1rank"][0]
    assert qlora["base_bytes_total"] > 0 and qlora["tokens_per_s"] > 0 and qlora["world_size"] == 1
    assert report["environment"]["versions"]["deepspeed"] and report["model"]["source"].startswith("tiny LLaMA")


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_report_reads_pytest_outcomes_and_the_benches_json(tmp_path):
    gpu_check = load_gpu_check()
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.gpu.test_a" name="test_ok" time="1.26">'
        '<properties><property name="syncs" value="{}"/></properties></testcase>'
        '<testcase classname="tests.gpu.test_a" name="test_bad" time="2"><failure message="assert 1 == 2"/></testcase>'
        '<testcase classname="tests.gpu.test_b" name="test_broken" time="0"><error message="fixture"/></testcase>'
        '<testcase classname="tests.gpu.test_b" name="test_cpu" time="0"><skipped message="no CUDA"/></testcase>'
        "</testsuite></testsuites>"
    )
    report = gpu_check.junit(xml)
    assert report["counts"] == {"passed": 1, "failed": 1, "error": 1, "skipped": 1}
    assert report["cases"]["test_a::test_ok"] == {"outcome": "passed", "s": 1.3, "recorded": {"syncs": "{}"}}
    assert report["cases"]["test_a::test_bad"]["message"] == "assert 1 == 2"
    printed = 'progress {"not": "this"}\n{\n  "a": 1,\n  "b": {"c": [2]}\n}\n'
    assert gpu_check.last_json("log line\n" + printed) == {"a": 1, "b": {"c": [2]}}
    assert gpu_check.last_json("no json here") is None
