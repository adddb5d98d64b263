"""The house has no loops: the import graph of the non-test code is layered and acyclic (DESIGN.md, "Layout").

Layers, higher uses lower only: ``benchmarks → algos → envs → rlkit_diffusion``. ``rlkit_diffusion`` imports none
of the three; ``envs`` imports neither ``algos`` nor ``benchmarks``; ``algos`` does not import ``benchmarks``; nothing
outside ``tests/`` imports ``tests``. Every import counts — module-level and the ones inside functions — and the
module graph (file → file) must have no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rlkit_diffusion", "envs", "algos", "benchmarks")
LAYER = {"rlkit_diffusion": 0, "envs": 1, "algos": 2, "benchmarks": 3, "examples": 4, "tests": 5}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {}
    for top in (*PACKAGES, "examples"):
        for path in sorted((ROOT / top).rglob("*.py")) if (ROOT / top).is_dir() else []:
            found[_module_name(path)] = path
    return found


def _resolve(target: str, known: dict[str, Path]) -> str | None:
    """The project module a dotted import target lands in (``pkg.name`` → ``pkg`` when name is not a module)."""
    if target.split(".")[0] not in LAYER:
        return None
    if target == "tests" or target.startswith("tests."):
        return target
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def _imports(source: str, name: str, is_pkg: bool, known: dict[str, Path]) -> set[str]:
    """Every project module that a file imports (absolute and relative, at any depth of the file)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([mod] if mod else []))
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        out.update(r for r in (_resolve(t, known) for t in targets) if r)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(path.read_text(), name, path.name == "__init__.py", known) for name, path in known.items()}


def test_every_import_points_down_the_layers():
    bad = []
    for name, deps in _graph().items():
        here = LAYER[name.split(".")[0]]
        for dep in deps:
            top = dep.split(".")[0]
            if top == "tests" or LAYER[top] > here:
                bad.append(f"{name} imports {dep}")
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(bad))


def test_the_module_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from rlkit_diffusion.mdp import DenoisingCore", {"rlkit_diffusion.mdp"}),
        ("def f():\n    from algos.dpo import DPO", {"algos.dpo"}),
        ("import benchmarks.report", {"benchmarks.report"}),
        ("from tests.helpers import compose_cfg", {"tests.helpers"}),
        ("from . import policy", {"rlkit_diffusion.policy"}),
    ],
)
def test_the_walker_sees_every_kind_of_import(source, expected):
    """The checker itself can fail: function-level, relative and test imports are all found."""
    assert expected <= _imports(source, "rlkit_diffusion.probe", False, _modules())
