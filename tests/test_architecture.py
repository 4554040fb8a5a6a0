"""The shape of the code the issue tracker asked for, held by tests: data flows one way (no import
cycles, lazy imports inside functions included) and one module calls kronfluence's stages."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from kronfluence.analyzer import Analyzer

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "influence_doctor"
STAGE_MODULE = "influence_doctor.runner.calls"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in SRC.joinpath(PACKAGE).rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere (top level or inside a function). Imports of
    a module's own parent packages are left out: every submodule runs its package's __init__ first."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                candidates = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            for target in candidates:
                if target in modules and target != name and not (name + ".").startswith(target + "."):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert graph["influence_doctor.doctor"], "the graph was read"
    assert cycles(graph) == []


def test_only_the_stage_module_calls_kronfluences_stages():
    stage_calls = {name for name in dir(Analyzer) if name.startswith(("fit_", "perform_", "compute_"))}
    assert {"fit_covariance_matrices", "perform_eigendecomposition", "compute_pairwise_scores"} <= stage_calls
    callers = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in stage_calls:
                callers.setdefault(name, set()).add(node.func.attr)
    assert set(callers) == {STAGE_MODULE}, callers


def test_experiments_and_rungs_share_one_vocabulary_of_changes():
    """Every experiment step in the cause table and every rung of every ladder plans with one registry."""
    from influence_doctor.causes import CAUSES, STRATEGY_FALLBACK, default_ladders
    from influence_doctor.changes import PLANNERS

    rungs = {rung for ladder in default_ladders().values() for rung in ladder} | set(STRATEGY_FALLBACK)
    assert {rung.partition(":")[0] for rung in rungs} <= set(PLANNERS)
    # every change an experiment names in the cause table: "kind:argument" literals and f-strings
    tree = ast.parse(Path(SRC / PACKAGE / "causes.py").read_text(encoding="utf-8"))
    named = set()
    for node in ast.walk(tree):
        literal = isinstance(node, ast.Constant) and isinstance(node.value, str)
        if literal and re.fullmatch(r"[a-z0-9-]+:\S+", node.value):
            named.add(node.value.partition(":")[0])
        elif isinstance(node, ast.JoinedStr) and isinstance(node.values[0], ast.Constant):
            head = str(node.values[0].value)
            if re.fullmatch(r"[a-z0-9-]+:", head):
                named.add(head[:-1])
    assert {"dtype", "float64", "damping", "shift"} <= named
    assert named <= set(PLANNERS), named - set(PLANNERS)
    assert CAUSES
