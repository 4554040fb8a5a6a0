"""The pytest plugin through real pytest runs (pytester): inert without the flag, one item per stage
plus gates with it, baselines, the terminal summary, GitHub step summary and JUnit properties."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import kronfluence.analyzer  # noqa: F401
import pytest
import scipy.stats  # noqa: F401

# In-process pytest runs drop the modules they imported first; C extensions cannot be imported twice,
# so everything heavy the plugin will load is imported here, once, by the outer session.
import influence_doctor.doctor
import influence_doctor.gates  # noqa: F401
import influence_doctor_pytest.session  # noqa: F401

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
STAGE_ITEMS = ["train", "covariance", "eigendecomposition", "lambda", "pairwise_scores", "self_scores", "gates"]


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A scratch project whose pytest runs in a subprocess: an in-process run would drop torch's lazily
    imported extension modules afterwards, and those cannot be imported twice."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the test pipelines and fixtures live in this repository
    return pytester


def _configure(pytester: pytest.Pytester, pipelines: list[str], extra: str = "") -> None:
    listed = ", ".join(f'"{p}"' for p in pipelines)
    pytester.makepyprojecttoml(f"[tool.influence-doctor]\npipelines = [{listed}]\n{extra}")


def test_plugin_import_is_light():
    code = (
        "import sys, influence_doctor_pytest\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "heavy = {'torch', 'kronfluence', 'scipy', 'hypothesis', 'matplotlib'} & loaded\n"
        "print(sorted(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_without_the_flag_influence_tests_are_skipped_and_nothing_runs(project):
    project.makepyfile(
        """
        import pytest

        @pytest.mark.influence
        def test_marked():
            raise AssertionError("must not run")

        def test_fixture(influence_doctor):
            raise AssertionError("must not run")

        def test_ordinary():
            assert True
        """
    )
    result = project.runpytest_subprocess()
    result.assert_outcomes(passed=1, skipped=2)
    assert not re.search(r"=+ influence-doctor =+", result.stdout.str())  # no summary section


def test_each_pipeline_becomes_stage_items_and_a_gate(project, monkeypatch):
    summary = project.path / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    _configure(project, ["tests.pipelines:small"])
    result = project.runpytest_subprocess("--influence-check", "-v", "--junitxml=junit.xml", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=7)
    out = result.stdout.str()
    for stage in STAGE_ITEMS:
        assert f"small::{stage} PASSED" in out
    assert re.search(r"=+ influence-doctor =+", out) and "healthy" in out
    assert "### influence-doctor: small" in summary.read_text()
    junit = (project.path / "junit.xml").read_text()
    assert 'name="influence_stage" value="covariance"' in junit
    assert list((project.path / "reports" / "small").glob("*/report.json"))


def test_a_sick_pipeline_fails_its_stage_and_gate(project, monkeypatch):
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    project.makepyprojecttoml("[tool.influence-doctor]\n")
    result = project.runpytest_subprocess(
        "--influence-check",
        "--influence-pipeline",
        "fixtures.diverging_training:diverging_training",
        "-p",
        "no:cacheprovider",
    )
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) >= 2  # train fails, and so do the gates
    out = result.stdout.str()
    assert "train.parameters_finite" in out or "train.loss_finite" in out
    assert "gates failed" in out and "status" in out, out
    annotations = [line for line in out.splitlines() if line.startswith(("::error ", "::warning "))]
    assert any(line.startswith("::error title=influence-doctor diverging-training%3A train") for line in annotations), (
        annotations
    )
    assert all("::" in line.split(" ", 1)[1] for line in annotations)  # title=…::message


def test_under_xdist_each_pipeline_is_diagnosed_once_and_summarised_once(project, monkeypatch):
    summary = project.path / "step-summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    _configure(project, ["tests.pipelines:small", "tests.pipelines:small_twin"])
    result = project.runpytest_subprocess("--influence-check", "-n", "2", "-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=14)
    out = result.stdout.str()
    workers: dict[str, set[str]] = {}
    for worker, pipeline in re.findall(r"\[(gw\d+)\].*?PASSED (small(?:-twin)?)::", out):
        workers.setdefault(pipeline, set()).add(worker)
    assert set(workers) == {"small", "small-twin"} and all(len(w) == 1 for w in workers.values()), workers
    for pipeline in ("small", "small-twin"):
        reports = list((project.path / "reports" / pipeline).glob("*/report.json"))
        assert len(reports) == 1, reports  # diagnosed exactly once
        gates = json.loads(reports[0].read_text())["gates"]
        assert {g["name"] for g in gates} >= {"status", "fail_on"} and all(g["verdict"] == "pass" for g in gates)
        assert summary.read_text().count(f"### influence-doctor: {pipeline}\n") == 1
    assert len(re.findall(r"=+ influence-doctor =+", out)) == 1


def test_remedies_fail_the_gate_when_not_allowed(project):
    gates = "[tool.influence-doctor.gates]\nallow_remedies = false\n"
    _configure(project, ["fixtures.eigenvectors_fp16:eigenvectors_fp16"], gates)
    result = project.runpytest_subprocess("--influence-check", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6, failed=1)
    assert "allow_remedies" in result.stdout.str()


def test_baseline_is_written_then_held_to(project):
    _configure(project, ["tests.pipelines:small"])
    first = project.runpytest_subprocess("--influence-check", "--influence-update-baseline", "-p", "no:cacheprovider")
    first.assert_outcomes(passed=7)
    baseline = project.path / "reports" / "baselines" / "small"
    assert (baseline / "report.json").is_file() and (baseline / "scores.safetensors").is_file()
    second = project.runpytest_subprocess("--influence-check", "-p", "no:cacheprovider", "-v")
    second.assert_outcomes(passed=7)


def test_bad_target_is_a_usage_error(project):
    project.makepyprojecttoml("[tool.influence-doctor]\n")
    result = project.runpytest_subprocess("--influence-check", "--influence-pipeline", "nowhere_xyz:thing")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "cannot be found" in result.stderr.str()


def test_hand_written_test_with_the_fixture(project):
    project.makepyprojecttoml("[tool.influence-doctor]\n")
    project.makepyfile(
        """
        def test_small_is_healthy(influence_doctor):
            report = influence_doctor.diagnose("tests.pipelines:small")
            assert report.status == "healthy"
        """
    )
    result = project.runpytest_subprocess("--influence-check", "--influence-pipeline", "tests.pipelines:small")
    result.assert_outcomes(passed=8)
