"""What the package declares it needs is what it imports; where it relies on private APIs the range is bounded above;
CI installs the pinned versions of .ci/constraints.txt; and the test run turns our own deprecation warnings into
errors."""

from __future__ import annotations

import ast
import re
import sys
import warnings
from importlib.metadata import packages_distributions

import pytest
from launch import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def setup_requirements() -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    """setup.py's install_requires and extras_require, read from its source (not by running it)."""
    (call,) = [
        node
        for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"
    ]
    keywords = {
        k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")
    }
    extras = {name: [Requirement(r) for r in reqs] for name, reqs in keywords["extras_require"].items()}
    return [Requirement(r) for r in keywords["install_requires"]], extras


def third_party_imports() -> dict[str, bool]:
    """Top-level names of the third-party modules adapters_ds and launcher/ import → True where some import of it is
    at module level (needed by every user), False where all are inside functions (an optional feature)."""
    found: dict[str, bool] = {}
    for path in [*(REPO / "adapters_ds").rglob("*.py"), *(REPO / "launcher").glob("*.py")]:
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                if root not in sys.stdlib_module_names and root not in ("adapters_ds", "launcher"):
                    found[root] = found.get(root, False) or id(node) in top_level
    return found


def test_every_imported_package_is_declared():
    required, extras = setup_requirements()
    declared = {canonicalize_name(r.name) for r in required}
    optional = {canonicalize_name(r.name) for reqs in extras.values() for r in reqs}
    distributions = packages_distributions()
    for module, at_module_level in sorted(third_party_imports().items()):
        names = {canonicalize_name(d) for d in distributions.get(module, [])}
        assert names, f"{module} is imported but no installed distribution provides it"
        allowed = declared if at_module_level else declared | optional
        assert names & allowed, f"{module} ({sorted(names)}) is imported but not declared in setup.py"


def test_private_api_dependencies_are_bounded_above_and_ci_installs_pinned_versions():
    required, extras = setup_requirements()
    by_name = {canonicalize_name(r.name): r for r in required}
    for name in ("deepspeed", "transformers"):  # the code uses their private APIs (setup.py says where)
        assert any(spec.operator == "<" for spec in by_name[name].specifier), f"{name} has no upper bound"
    pins = {}
    for line in (REPO / ".ci" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    for requirement in [*required, *(r for reqs in extras.values() for r in reqs)]:
        name = canonicalize_name(requirement.name)
        if name == "torch":  # .ci/setup installs the build for the machine
            continue
        assert name in pins, f"{name} is declared but not pinned in .ci/constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name], requirement)
    setup = (REPO / ".ci" / "setup").read_text()
    installs = [line for line in setup.splitlines() if re.search(r"pip install .*-e ", line)]
    assert installs and all("-c .ci/constraints.txt" in line for line in installs), installs


@pytest.mark.parametrize("category", [DeprecationWarning, PendingDeprecationWarning, FutureWarning])
def test_our_own_deprecation_warnings_are_errors_in_the_test_run(category):
    with pytest.raises(category, match="on its way out"):
        warnings.warn_explicit("an API on its way out", category, "x.py", 1, module="adapters_ds.training.trainer")
