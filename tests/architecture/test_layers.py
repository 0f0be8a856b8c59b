"""The package keeps its one-way dependency rule (see layers.py), and the checker can tell when it does not."""

from __future__ import annotations

from pathlib import Path

from launch import REPO

from architecture.layers import LAYERS, violations


def test_the_package_follows_the_dependency_rule():
    assert violations(REPO / "adapters_ds") == []


def test_every_unit_of_the_package_has_a_layer():
    root = REPO / "adapters_ds"
    units = {p.stem for p in root.glob("*.py")} | {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}
    placed = {unit for layer in LAYERS for unit in layer}
    assert units <= placed, sorted(units - placed)


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "adapters_ds" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "adapters_ds"


def test_the_checker_finds_upward_peer_and_function_level_imports_and_cycles(tmp_path):
    root = write(
        tmp_path,
        {
            "__init__.py": "",
            "errors.py": "",
            "modeling.py": "def f():\n    from adapters_ds.training import trainer  # upward, inside a function\n",
            "adapters/__init__.py": "",
            "adapters/base.py": "import adapters_ds.adapters.inject\n",
            "adapters/inject.py": "from adapters_ds.adapters import base\n",  # a cycle inside one package
            "training/__init__.py": "",
            "training/trainer.py": "from adapters_ds.evaluation.harness import run\n",  # a peer
            "evaluation/__init__.py": "",
            "evaluation/harness.py": "from adapters_ds.errors import InputError\nrun = 1\n",
            "cli/__init__.py": "",
            "cli/train.py": "from adapters_ds.training.trainer import x\n" + "\n" * 460,  # fine, but too long
        },
    )
    found = "\n".join(violations(root))
    assert "adapters_ds.modeling:2 imports adapters_ds.training.trainer" in found
    assert "adapters_ds.training.trainer:1 imports adapters_ds.evaluation.harness" in found
    assert (
        "import cycle: adapters_ds.adapters.base -> adapters_ds.adapters.inject -> adapters_ds.adapters.base" in found
    )
    assert "adapters_ds.cli.train: 461 lines" in found
    assert len(violations(root)) == 4


def test_the_checker_accepts_a_clean_tree(tmp_path):
    root = write(
        tmp_path,
        {
            "__init__.py": "from adapters_ds.cli import train\n",
            "errors.py": "",
            "adapters/__init__.py": "from adapters_ds.adapters import lora\n",
            "adapters/lora.py": "from adapters_ds.errors import InputError\n",
            "cli/__init__.py": "",
            "cli/train.py": "from adapters_ds.adapters.lora import InputError\n",
            "mathdata/__init__.py": "",
            "mathdata/__main__.py": "from adapters_ds.cli.train import InputError\n",
        },
    )
    assert violations(root) == []
