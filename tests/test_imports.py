"""The package's import graph is a DAG: no module of reinforce_cot imports, at module level or inside a
function, one that imports it back (directly or through others).

A lazy import inside a function is still a dependency: it only hides a cycle from Python's import
machinery. The layers the graph must respect are in reinforce_cot/__init__.py's docstring.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "reinforce_cot"
ROOT = "reinforce_cot"


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (`reinforce_cot.hardware`; a sub-package by its __init__)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = [ROOT, *path.relative_to(package).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _target(name: str, mods: dict) -> str | None:
    """The module an imported dotted name lives in: the longest prefix that is a module."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in mods:
            return ".".join(parts[:n])
    return None


def imports(mods: dict[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {module it imports: line of the first such import}, for imports anywhere in its file."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [_target(a.name, mods) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from .x import y
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([base] if base else [])])
                # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself
                targets = [_target(f"{base}.{a.name}", mods) or _target(base, mods) for a in node.names]
            else:
                continue
            for t in targets:
                if t is not None and t != name:
                    edges.setdefault(t, node.lineno)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of the graph, or None when it is a DAG."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph.get(v, {})):
            if state.get(w) == 1:
                return path[path.index(w) :] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_find_cycle_sees_a_lazy_import(tmp_path):
    """The checker itself: an import inside a function closes a cycle just as a module-level one does."""
    pkg = tmp_path / ROOT
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from reinforce_cot import b\n")
    (pkg / "b.py").write_text("def f():\n    from reinforce_cot.a import g\n")
    (pkg / "c.py").write_text("from . import a\n")
    graph = imports(modules(pkg))
    assert graph[f"{ROOT}.b"] == {f"{ROOT}.a": 2} and graph[f"{ROOT}.c"] == {f"{ROOT}.a": 1}
    assert find_cycle(graph) == [f"{ROOT}.a", f"{ROOT}.b", f"{ROOT}.a"]
    (pkg / "b.py").write_text("")
    assert find_cycle(imports(modules(pkg))) is None


def test_no_import_cycles():
    mods = modules()
    graph = imports(mods)
    assert len(graph) > 30 and sum(map(len, graph.values())) > 60, "the graph lost its edges: this test guards nothing"
    cycle = find_cycle(graph)
    if cycle:
        hops = [f"{a} -> {b} ({mods[a].relative_to(PACKAGE.parent)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import cycle:\n  " + "\n  ".join(hops))


# What every other module may import: process handling, the run-dir layout, the override rule, the entry
# plumbing and the errors. Orchestration that creeps down into them (validating stages inside
# hardware.launch) is what made the old cycles, so they may import nothing but each other.
FOUNDATION = ("errors", "hardware", "rundir", "overrides", "cli")


def test_the_foundation_imports_nothing_above_it():
    graph = imports(modules())
    allowed = {f"{ROOT}.{m}" for m in FOUNDATION}
    above = {m: sorted(set(graph[f"{ROOT}.{m}"]) - allowed) for m in FOUNDATION}
    assert above == {m: [] for m in FOUNDATION}
