"""The dependency rule of adapters_ds, as data and a checker (used by test_layers.py).

A module may import modules of strictly lower layers and modules of its own unit (a top-level module is a unit; a
subpackage with all its modules is one). Units of the same layer are peers and must not import each other. No
import cycle anywhere, function-level imports included. `__main__` modules are entry points and stand above all.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "adapters_ds"
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("fileio",),
    ("hardware",),
    ("zero",),
    ("prompts",),
    ("records",),
    ("conversations",),
    ("families",),
    ("distributed",),
    ("pruned_model",),
    ("quantization",),
    ("modeling",),
    ("adapters",),
    ("training", "evaluation", "export", "mathdata"),
    ("demo",),
    ("cli",),
    ("__init__", "__main__"),  # the public API of the package root, and entry points
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
MAX_LINES = 450


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    if parts[-1] == "__main__":
        return "__main__"
    return parts[1] if len(parts) > 1 else "__init__"


def modules(root: Path) -> dict[str, Path]:
    return {module_name(root, p): p for p in sorted(root.rglob("*.py"))}


def imports(root: Path, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported adapters_ds module, line) for every import in the file, at any depth."""
    found = []
    this = module_name(root, path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod where one exists
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                while target not in known and "." in target:
                    target = target.rpartition(".")[0]
                found.append((target, node.lineno))
    return found


def violations(root: Path) -> list[str]:
    """Every breach of the rule in the package at `root`, as readable lines (empty when the tree is clean)."""
    mods = modules(root)
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    problems = []
    for module, path in mods.items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            problems.append(f"{module}: {lines} lines (more than {MAX_LINES})")
        src_unit = unit_of(module)
        for target, line in imports(root, path, known):
            if target == module:
                continue
            graph[module].add(target)
            dst_unit = unit_of(target)
            if src_unit == dst_unit:
                continue
            if src_unit not in RANK or dst_unit not in RANK:
                unknown = src_unit if src_unit not in RANK else dst_unit
                problems.append(f"{module}:{line}: unit {unknown!r} has no layer in the dependency rule")
            elif RANK[dst_unit] >= RANK[src_unit]:
                problems.append(
                    f"{module}:{line} imports {target}: layer {RANK[dst_unit]} ({dst_unit}) is not below "
                    f"layer {RANK[src_unit]} ({src_unit})"
                )
    problems += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component) + [sorted(component)[0]])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found
