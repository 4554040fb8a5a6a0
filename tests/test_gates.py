"""Gates and `influence-doctor compare`: each gate can pass and fail, on real reports where it matters."""

from __future__ import annotations

import copy
import json

import pytest
from safetensors.torch import load_file, save_file

from influence_doctor import diagnose
from influence_doctor.config import Gates
from influence_doctor.errors import UsageError
from influence_doctor.gates import MIN_TIMED_SECONDS, evaluate, load_report, write_baseline
from tests.pipelines import small_pipeline


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    first = diagnose(small_pipeline(), out_dir=out, progress=False, probe_examples=0)
    second = diagnose(small_pipeline(), out_dir=out, progress=False, probe_examples=0)
    return first, second


def _by_gate(results):
    return {r.gate: r for r in results}


def test_identical_runs_pass_every_gate(two_runs):
    first, second = two_runs
    results = _by_gate(evaluate(second.document, Gates(), first.document, second.run_dir, first.run_dir))
    assert all(r.passed for r in results.values()), results
    assert results["min_score_spearman"].detail == "bit-identical scores"


def test_score_spearman_is_computed_from_the_scores_files(two_runs, tmp_path):
    first, second = two_runs
    current = copy.deepcopy(second.document)
    for kind in ("pairwise", "self"):
        current["scores"][kind]["digest"] = "sha256:different"
    reversed_dir = tmp_path / "reversed"
    reversed_dir.mkdir()
    scores = {kind: -value for kind, value in load_file(str(second.run_dir / "scores.safetensors")).items()}
    save_file(scores, str(reversed_dir / "scores.safetensors"))
    result = _by_gate(evaluate(current, Gates(), first.document, reversed_dir, first.run_dir))["min_score_spearman"]
    assert result.passed is False and result.value == pytest.approx(-1.0)


def test_status_severity_remedies_and_condition_gates_fail_when_they_should(two_runs):
    document = copy.deepcopy(two_runs[0].document)
    document["status"] = "sick"
    document["remedies"] = [{"rung": "damping:heuristic"}]
    document["stages"][3]["findings"].append({"severity": "warn", "check": "lambda.condition"})
    document["stages"][3]["metrics"].setdefault("checks", {})["x"] = {"condition_after_damping": "inf"}
    results = _by_gate(evaluate(document, Gates(fail_on="warn", allow_remedies=False)))
    assert not results["status"].passed
    assert not results["fail_on"].passed and "lambda.condition" in results["fail_on"].detail
    assert not results["allow_remedies"].passed
    assert not results["max_condition_number"].passed and results["max_condition_number"].value == float("inf")
    assert "min_score_spearman" not in results  # no baseline, no comparison gates


def test_stage_time_ratio_ignores_fast_stages_and_catches_slow_ones(two_runs):
    baseline = copy.deepcopy(two_runs[0].document)
    current = copy.deepcopy(baseline)
    assert _by_gate(evaluate(current, Gates(), baseline))["max_seconds_ratio"].passed
    baseline["stages"][1]["seconds"] = MIN_TIMED_SECONDS * 2
    current["stages"][1]["seconds"] = MIN_TIMED_SECONDS * 5
    result = _by_gate(evaluate(current, Gates(max_seconds_ratio=2.0), baseline))["max_seconds_ratio"]
    assert not result.passed and result.value == pytest.approx(2.5) and "covariance" in result.detail


def test_compare_cli_passes_fails_and_rejects_bad_input(cli, two_runs, tmp_path):
    first, second = two_runs
    passed = cli("compare", str(first.run_dir), str(second.json_path))
    assert passed.returncode == 0, passed.stderr
    assert "min_score_spearman" in passed.stdout and "PASS" in passed.stdout
    sick = json.loads(second.json_path.read_text())
    sick["status"] = "sick"
    (tmp_path / "sick").mkdir()
    (tmp_path / "sick" / "report.json").write_text(json.dumps(sick))
    failed = cli("compare", str(first.run_dir), str(tmp_path / "sick"), "--format", "json")
    assert failed.returncode == 1
    verdicts = {g["gate"]: g["passed"] for g in json.loads(failed.stdout)["gates"]}
    assert verdicts["status"] is False
    missing = cli("compare", str(tmp_path / "nope"), str(second.run_dir))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr


def test_load_report_rejects_json_that_is_not_a_report(tmp_path):
    (tmp_path / "report.json").write_text('{"hello": 1}')
    with pytest.raises(UsageError, match="not an influence-doctor report"):
        load_report(tmp_path)


def test_write_baseline_copies_report_and_scores(two_runs, tmp_path):
    target = write_baseline(two_runs[0].run_dir, tmp_path / "baselines", "small")
    assert (target / "report.json").read_bytes() == two_runs[0].json_path.read_bytes()
    assert (target / "scores.safetensors").is_file()
