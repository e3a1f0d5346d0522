"""Every ``from sgl_kernel import X`` on SGLang's CPU speculative path has a stand-in.

Reads the installed SGLang's source (no import of the modules themselves), so an upgrade
that starts importing a new CPU kernel fails here, naming it.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from sglang_dsde.patches import sgl_kernel_standins as sk


def _cpu_branch(node, parents) -> bool:
    """Whether the nearest ``if`` around ``node`` (in its body, not its else) tests CPU."""
    child = node
    while child in parents:
        parent = parents[child]
        if isinstance(parent, ast.If) and child in parent.body:
            return "cpu" in ast.unparse(parent.test).lower()
        child = parent
    return False


def _sgl_kernel_cpu_names(module: str) -> set[str]:
    """Names imported from ``sgl_kernel`` on CPU: in an ``if ..cpu..`` branch, or ``*_cpu``."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{module} moved"
    tree = ast.parse(Path(spec.origin).read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    return {alias.name for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "sgl_kernel"
            for alias in node.names
            if alias.name.endswith("_cpu") or _cpu_branch(node, parents)}


@pytest.mark.parametrize("module", sk.IMPORTING_MODULES)
def test_every_imported_cpu_kernel_has_a_standin(module):
    names = _sgl_kernel_cpu_names(module)
    assert names, f"{module} no longer imports from sgl_kernel: update IMPORTING_MODULES"
    missing = sorted(names - sk.STANDIN_NAMES)
    assert not missing, f"{module} imports sgl_kernel names without a stand-in: {missing}"
