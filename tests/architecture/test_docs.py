"""Docstrings and comments state contracts: they refer to no issue or closing note of the project's tracker, and the
GPU check ships on its own (it runs the suite's GPU tests, it does not import from them)."""

from __future__ import annotations

import ast
import re

from launch import REPO

TRACKER = re.compile(r"\b(issue|closing note)s? #?\d+", re.IGNORECASE)


def test_no_code_refers_to_the_issue_tracker():
    found = []
    for folder in ("adapters_ds", "launcher", "bench", "tests", "slurm", "ds_configs"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix in (".py", ".sh", ".md", ".json", ".yaml") and path.is_file():
                for number, line in enumerate(path.read_text().splitlines(), 1):
                    if TRACKER.search(line) and path != REPO / "tests" / "architecture" / "test_docs.py":
                        found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert found == []


def test_the_gpu_check_imports_nothing_from_the_tests():
    tree = ast.parse((REPO / "bench" / "gpu_check.py").read_text())
    modules = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    modules += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    local_tests = {p.stem for p in (REPO / "tests").glob("*.py")} | {"tests", "conftest"}
    assert not [m for m in modules if m.split(".")[0] in local_tests], modules
