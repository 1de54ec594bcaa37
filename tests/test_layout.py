"""The package's layers: no import circle, and each folder imports only the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"moe_offload": "moe_offload", "cache": "moe_offload.cache", "predictor": "moe_offload.predictor",
            "transfer": "moe_offload.transfer", "cpu_kernels": "moe_offload.cpu_kernels"}
# folder -> the moe_offload folders it must never import (a lower layer never reaches up)
FORBIDDEN = {
    "moe_offload.cache": ("loading", "runtime", "simulate", "cli", "predictor", "transfer", "cpu_kernels"),
    "moe_offload.predictor": ("loading", "runtime", "simulate", "cli", "cache", "transfer", "cpu_kernels"),
    "moe_offload.transfer": ("loading", "runtime", "simulate", "cli", "cache", "predictor"),
    "moe_offload.cpu_kernels": ("loading", "runtime", "simulate", "cli", "cache", "predictor", "transfer"),
    "moe_offload.runtime": ("loading", "simulate", "cli"),
    "moe_offload.loading": ("simulate", "cli"),
    "moe_offload.simulate": ("cli",),
}


def modules() -> dict[str, Path]:
    """Every library module's dotted name -> file."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts))
            found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Library modules ``name`` imports, at module level or inside functions (a lazy import is an edge too);
    imports for type checking only are not edges."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _walk_runtime(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names}
    return {m for m in out if m in known and m != name}


def _walk_runtime(tree: ast.AST):
    """ast.walk, skipping ``if TYPE_CHECKING:`` blocks."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
            continue
        yield child
        yield from _walk_runtime(child)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_no_import_circle(graph):
    state: dict[str, int] = {}   # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + ".") or node.startswith(nxt + ".") and nxt.count(".") < node.count("."):
                continue   # a package importing its own submodules (and they, their package) is not a circle
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2
    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("package", list(FORBIDDEN))
def test_lower_layers_never_import_higher_ones(graph, package):
    bad = [(name, target) for name, targets in graph.items() if name == package or name.startswith(package + ".")
           for target in targets for folder in FORBIDDEN[package]
           if target == f"moe_offload.{folder}" or target.startswith(f"moe_offload.{folder}.")]
    assert not bad, f"{package} imports a higher layer: {bad}"
