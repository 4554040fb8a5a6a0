"""The shape of the code, held by tests: data flows one way through named layers (no import cycles, lazy
imports and package `__init__` files included), one module calls kronfluence's stages and one module runs
the stage sequence, and a cause's tag is spelled only in its row of the cause table and its check."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from kronfluence.analyzer import Analyzer

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "influence_doctor"
STAGE_MODULE = "influence_doctor.runner.calls"
SEQUENCE_MODULE = "influence_doctor.runner.executor"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "vocabulary",
        (
            "errors",
            "version",
            "atomic",
            "causes",
            "findings",
            "pipeline",
            "dtypes",
            "progress",
            "options",
            "environment",
            "distributed",
            "targets",
            "strategies",
        ),
    ),
    ("checks", ("checks",)),
    ("configuration", ("configuration", "changes", "config")),
    ("executor", ("runner",)),
    ("examination", ("examine", "labs", "audit", "probes", "diagnosis", "fidelity", "exact", "projection")),
    ("treatment", ("remedies",)),
    ("reports", ("report", "gates")),
    ("orchestration", ("doctor",)),
    ("shells", ("cli", "inspect", "demos", "__main__", "")),
)
"""The layers, bottom first, by module (a dotted name below the package; "" is the package's `__init__`): a
module imports only from its own layer and those below. README.md's "Layout" names the same layers."""

MAX_UPWARD_IMPORTS = 4


def _modules() -> dict[str, Path]:
    modules = {}
    for path in SRC.joinpath(PACKAGE).rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> Iterator[str]:
    """Every package module `name` imports, at the top or inside a function. `from pkg import x` imports
    the module `pkg.x` when there is one, else the package `pkg` itself: its `__init__` and what that
    imports, even lazily (a module's own parent package included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield submodule if submodule in modules else base
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """Module → the package modules it imports."""
    modules = modules or _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target in _imports(name, path, modules):
            if target in modules and target != name:
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


def layer_of(module: str) -> int:
    relative = module.removeprefix(PACKAGE).lstrip(".")
    for rank, (_name, members) in enumerate(LAYERS):
        for member in members:
            if relative == member or (member and relative.startswith(member + ".")):
                return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to README.md's Layout)")


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


STAGE_ENTRY = re.compile(r"^(fit|perform|compute)_")


def stage_entry_points() -> set[str]:
    """kronfluence's stage entry points: the Analyzer's methods and the module-level functions they call."""
    import kronfluence.factor.covariance
    import kronfluence.factor.eigen
    import kronfluence.score.pairwise
    import kronfluence.score.self

    names = {name for name in dir(Analyzer) if STAGE_ENTRY.match(name)}
    for module in (
        kronfluence.factor.covariance,
        kronfluence.factor.eigen,
        kronfluence.score.pairwise,
        kronfluence.score.self,
    ):
        names |= {name for name in dir(module) if STAGE_ENTRY.match(name) and callable(getattr(module, name))}
    return names


def references_to(tree: ast.AST, names: set[str]) -> set[str]:
    """Which of `names` the code refers to in any form: called or not (an attribute, an alias bound to it,
    `getattr` with its name, a name imported from anywhere, under any alias)."""
    found: set[str] = set()
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name in names:
                    found.add(alias.name)
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.Attribute) and node.attr in names:
            found.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
            found.add(node.value)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in aliases:
            found.add(aliases[node.id])
    return found


def modules_referring_to(names: set[str], modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    modules = modules or _modules()
    callers = {}
    for name, path in modules.items():
        found = references_to(ast.parse(path.read_text(encoding="utf-8")), names)
        if found:
            callers[name] = found
    return callers


# --- the tests ------------------------------------------------------------------------------------------


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_an_import_of_a_name_from_a_package_is_an_edge_to_its_init(tmp_path):
    """The cycle the reports once had: a module importing a name from the package's `__init__`, whose lazy
    import reaches back to that module."""
    package = tmp_path / "influence_doctor"
    (package / "report").mkdir(parents=True)
    (package / "__init__.py").write_text("def __getattr__(name):\n    from influence_doctor import doctor\n")
    (package / "doctor.py").write_text("from influence_doctor.report import document\n")
    (package / "report" / "__init__.py").write_text("")
    (package / "report" / "document.py").write_text("from influence_doctor import __version__\n")
    modules = {
        ".".join(p.relative_to(tmp_path).with_suffix("").parts).removesuffix(".__init__"): p
        for p in package.rglob("*.py")
    }
    graph = import_graph(modules)
    assert "influence_doctor" in graph["influence_doctor.report.document"]
    assert cycles(graph) == [["influence_doctor", "influence_doctor.doctor", "influence_doctor.report.document"]]


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert graph["influence_doctor.doctor"], "the graph was read"
    assert cycles(graph) == []


def test_data_flows_down_the_layers():
    graph = import_graph()
    upward = upward_imports(graph)
    assert len(upward) <= MAX_UPWARD_IMPORTS, upward


def test_the_readme_names_the_layers():
    readme = (SRC.parent / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout") :]
    for name, _members in LAYERS:
        assert f"**{name}**" in layout, name


def test_only_the_stage_module_refers_to_kronfluences_stages():
    entry = stage_entry_points()
    assert {"fit_covariance_matrices", "perform_eigendecomposition", "compute_pairwise_scores"} <= entry
    assert "fit_covariance_matrices_with_loader" in entry
    assert set(modules_referring_to(entry)) == {STAGE_MODULE}


@pytest.mark.parametrize(
    "planted",
    [
        "fit = analyzer.fit_covariance_matrices\nfit(factors_name='f', dataset=data)\n",
        "from kronfluence.factor.covariance import fit_covariance_matrices_with_loader as fit\nfit()\n",
        "call = getattr(analyzer, 'compute_pairwise_scores')\n",
        "import functools\nrun = functools.partial(analyzer.perform_eigendecomposition, factors_name='f')\n",
    ],
)
def test_the_stage_check_sees_an_aliased_call(planted):
    """Planted in a module, each of these makes the test above fail: it names that module."""
    assert references_to(ast.parse(planted), stage_entry_points())
    source = _modules()[f"{PACKAGE}.labs"].read_text(encoding="utf-8") + "\n\ndef _planted(analyzer, data):\n"
    source += "".join(f"    {line}\n" for line in planted.splitlines())
    assert references_to(ast.parse(source), stage_entry_points())


STAGE_FUNCTIONS = frozenset(
    {"fit_covariance", "eigendecompose", "fit_lambda", "pairwise_scores", "self_scores", "load"}
)
"""The functions of the stage module that run (or read back) a stage."""


def stage_function_users(tree: ast.AST) -> set[str]:
    """Which stage functions of `runner/calls.py` the code uses: imported by name, or as an attribute of
    the module under any name it was imported as."""
    used: set[str] = set()
    module_names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == STAGE_MODULE:
            used |= {alias.name for alias in node.names if alias.name in STAGE_FUNCTIONS}
        elif isinstance(node, ast.ImportFrom) and node.module == STAGE_MODULE.rpartition(".")[0]:
            module_names |= {alias.asname or alias.name for alias in node.names if alias.name == "calls"}
        elif isinstance(node, ast.Import):
            module_names |= {alias.asname or alias.name for alias in node.names if alias.name == STAGE_MODULE}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in STAGE_FUNCTIONS:
            holder = node.value
            dotted = ast.unparse(holder)
            if dotted in module_names:
                used.add(node.attr)
    return used


def test_only_the_executor_runs_the_stage_sequence():
    """The stage functions of the kronfluence calls module are used by the executor alone: every trial (the
    run, the probes, the experiments, the rungs, the pilots, the full-size covariance) goes through one
    stage loop."""
    users = {
        name
        for name, path in _modules().items()
        if name != STAGE_MODULE and stage_function_users(ast.parse(path.read_text(encoding="utf-8")))
    }
    assert users == {SEQUENCE_MODULE}
    planted = "from influence_doctor.runner import calls as c\n\ndef f(a):\n    c.fit_lambda(a, 'f', None, 1, None)\n"
    assert stage_function_users(ast.parse(planted)) == {"fit_lambda"}


def test_a_cause_tag_is_spelled_in_its_row_and_its_check_only():
    """A new cause costs its row of the cause table, the check that emits it, and their tests."""
    from influence_doctor.causes import TAGS

    spelled: dict[str, set[str]] = {tag: set() for tag in TAGS}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in spelled:
                spelled[node.value].add(name)
    assert all(f"{PACKAGE}.causes" in modules for modules in spelled.values())
    too_many = {tag: sorted(modules) for tag, modules in spelled.items() if len(modules) > 2}
    assert not too_many


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


def test_only_the_changes_make_a_configuration():
    """A Configuration is made from another by `changes.py` alone (its `with_` and the arguments'
    `replace`): an experiment, a rung and the float64 reference are changes, nothing else alters one."""
    editors = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "with_":
                editors.setdefault(name, set()).add("with_")
    assert set(editors) <= {f"{PACKAGE}.changes"}, editors
