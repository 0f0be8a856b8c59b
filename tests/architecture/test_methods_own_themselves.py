"""A method owns everything about itself: no module outside the methods names one, method code reaches the other
ranks only through `adapters_ds.distributed`, and a config is data (injecting and preparing a method neither reads
files nor changes its config)."""

from __future__ import annotations

import ast
import builtins
import io
from pathlib import Path

import pytest
from launch import REPO
from tiny_models import make_model
from tiny_tokenizer import make_tokenizer

import adapters_ds
from adapters_ds import freeze_base, get_method, inject_adapters, strategy_for

ADAPTERS = REPO / "adapters_ds" / "adapters"
PROTOCOL = {"__init__", "base", "registry", "inject", "storage"}  # adapters/ modules that are no method's
ALLOWED = {  # (module, string): why the string is no method's name there
    ("adapters_ds/training/args.py", "lora"): "the default of --adapter (the command's choice, not a list)",
    ("adapters_ds/evaluation/results.py", "prompt"): "a result row's field, the text given to the model",
}
DISTRIBUTED = ("torch.distributed", "deepspeed.comm")


def outside_methods() -> list[Path]:
    method_files = {p for p in ADAPTERS.glob("*.py") if p.stem not in PROTOCOL}
    files = [*(REPO / "adapters_ds").rglob("*.py"), *(REPO / "launcher").glob("*.py")]
    return sorted(p for p in files if p not in method_files)


def strings(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, value) of every string constant that is not a docstring."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_no_module_outside_a_method_names_one():
    names = set(adapters_ds.METHODS)
    found = []
    for path in outside_methods():
        module = str(path.relative_to(REPO))
        for line, value in strings(ast.parse(path.read_text())):
            if value in names and (module, value) not in ALLOWED:
                found.append(f"{module}:{line}: {value!r}")
    assert found == []


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def distributed_uses(tree: ast.Module) -> list[int]:
    """Lines that reach torch.distributed or deepspeed.comm: imports of them and attribute chains through them."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Attribute):
            modules = [dotted(node)]
        else:
            continue
        if any(m == d or m.startswith(d + ".") for m in modules for d in DISTRIBUTED):
            lines.append(node.lineno)
    return sorted(set(lines))


def test_method_code_never_calls_torch_distributed_itself():
    found = {}
    for path in sorted(ADAPTERS.glob("*.py")):
        lines = distributed_uses(ast.parse(path.read_text()))
        if lines:
            found[path.name] = lines
    assert found == {}, "use adapters_ds.distributed (Ranks, group_sum, broadcast_tensor)"


def test_the_checks_find_what_they_look_for():
    tree = ast.parse(
        '"""lora in a docstring is fine"""\n'
        "import torch.distributed as dist\n"
        "from deepspeed import comm\n"
        "x = torch.distributed.get_rank()\n"
        "if name == 'gates':\n    pass\n"
    )
    assert distributed_uses(tree) == [2, 3, 4]
    assert [value for _, value in strings(tree)] == ["gates"]


@pytest.mark.parametrize("method", sorted(adapters_ds.METHODS))
def test_a_config_is_data_injection_and_preparation_neither_read_files_nor_change_it(method, monkeypatch):
    tokenizer = make_tokenizer()
    config = get_method(method).config()
    before = config.to_dict()
    resolved = config.resolve(tokenizer)  # the one step that may read the tokenizer: a new config
    assert config.to_dict() == before
    saved = resolved.to_dict()
    model = make_model("llama")

    def no_io(*args, **kwargs):
        raise AssertionError(f"{method}: a file was opened during injection: {args[:1]}")

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", no_io)
        m.setattr(io, "open", no_io)
        inject_adapters(model, resolved)
        freeze_base(model)
        strategy_for(resolved).prepare(model)
    assert resolved.to_dict() == saved
    assert type(resolved).from_dict(saved).to_dict() == saved  # the saved form rebuilds the same config


@pytest.mark.parametrize("method", sorted(adapters_ds.METHODS))
def test_how_a_method_trains_is_its_strategy_not_its_config(method):
    registered = get_method(method)
    hooks = [name for name in vars(adapters_ds.Strategy) if not name.startswith("_")]
    assert hooks and not [name for name in hooks if hasattr(registered.config, name)], method
    assert issubclass(registered.strategy, adapters_ds.Strategy)
