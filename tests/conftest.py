from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """The real command line in a subprocess, as a user would call it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "influence_doctor", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def written_by_the_doctor(text: str) -> bool:
    """Whether a report.json's text is the doctor's, even cut short: it opens with the schema version and
    names the tool (a test's hand-made bad input does neither)."""
    head = text.lstrip()[:200]
    return head.startswith("{") and '"schema_version"' in head and '"influence-doctor"' in head


def fix_fidelity_errors(document: dict) -> list[str]:
    """A healed report with no reference for its fix, or whose fix falls below its own bar, is a bug."""
    if document.get("status") != "healed":
        return []
    fix = (document.get("fidelity") or {}).get("fix") or {}
    if fix.get("reference") is None:
        return [f"healed, but fidelity.fix has no reference ({fix.get('reason')})"]
    median, limit = fix.get("median_spearman"), fix.get("limit")
    if median is None and fix.get("undefined_reference"):  # influence as given is inf/NaN: nothing to distort
        return []
    if median is None or limit is None or median < limit:
        return [f"healed, but fidelity.fix.median_spearman {median} is below min_fix_spearman {limit}"]
    return []


@pytest.fixture
def cli():
    return run_cli


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, each worker's torch (and the processes it starts) gets its share of the cores: two
    workers of two threads each on two cores spin against each other, and tiny tensors pay for it many
    times over."""
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    if workers > 1:
        share = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)
        import torch

        torch.set_num_threads(share)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every report.json the suite wrote (API, CLI subprocesses, pytester runs, partial reports) must
    follow the shipped JSON Schema: a schema no test holds reports to is a promise nobody checks. And
    every healed one must say what its fix cost against a reference, at or above its bar."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None or hasattr(session.config, "workerinput"):  # under xdist the controller checks all
        return
    try:
        basetemp = factory.getbasetemp()
    except (OSError, ValueError):
        return
    from influence_doctor.report.schema import schema_errors

    broken: list[str] = []
    checked = 0
    for path in sorted(Path(basetemp).rglob("report.json")):
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            document = json.loads(text)
        except ValueError as exc:
            if written_by_the_doctor(text):  # a truncated or corrupt report of ours is a bug
                checked += 1
                broken.append(f"{path}: the doctor wrote a report.json that does not parse ({exc})")
            continue  # otherwise hand-made bad input of a test
        if not isinstance(document, dict) or document.get("tool", {}).get("name") != "influence-doctor":
            continue
        checked += 1
        broken += [f"{path}: {error}" for error in schema_errors(document)[:5]]
        broken += [f"{path}: {error}" for error in fix_fidelity_errors(document)]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and checked:
        reporter.write_line(f"report schema: {checked} report.json file(s) checked, {len(broken)} error(s)")
    if broken:
        if reporter is not None:
            for line in broken[:50]:
                reporter.write_line(f"  {line}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
