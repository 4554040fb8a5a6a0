"""Gates and `influence-doctor compare`: each gate can pass and fail, on real reports where it matters."""

from __future__ import annotations

import copy
import json

import pytest
from safetensors.torch import load_file, save_file

from influence_doctor import diagnose
from influence_doctor.config import Gates
from influence_doctor.errors import UsageError
from influence_doctor.gates import evaluate, load_report, write_baseline
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


def test_condition_written_as_strict_json_null_with_its_reason_still_fails():
    document = {"status": "healthy", "stages": [{"findings": [], "metrics": {"checks": {"m": {}}}}], "remedies": []}
    document["stages"][0]["metrics"]["checks"]["m"] = {
        "condition_after_damping": None,
        "condition_after_damping_nonfinite": "inf",
    }
    result = _by_gate(evaluate(document, Gates()))["max_condition_number"]
    assert not result.passed and result.value == float("inf")


def test_a_fix_worse_than_the_problem_is_advice_not_a_cure(tmp_path):
    """eigenvectors_fp16 with only the identity strategy on its ladder: identity clears the drift but its
    rankings are far from float64 of the configuration as given, so the bar rejects it before it is
    applied; the pipeline stays sick and the report lists the option with its measured cost."""
    from fixtures import load_fixture

    pipeline, _ = load_fixture("eigenvectors_fp16")
    report = diagnose(pipeline, out_dir=tmp_path, progress=False, ladders={"dtype-drift": ["strategy:identity"]})
    assert report.status == "sick"
    assert not [r for r in report.remedies if r["outcome"] != "exhausted"]  # nothing applied
    (advice,) = report.prescription["advice"]  # the best of the strategy changes the bar rejected
    assert advice["rung"].startswith("strategy:") and advice["method_changed"] is True
    assert advice["factor_args"] == {"strategy": advice["rung"].partition(":")[2]}
    assert advice["fidelity"]["median_spearman"] < 0.9 and advice["fidelity"]["reference"] == "float64 as configured"
    reasons = {s["rung"]: s["reason"] for r in report.remedies for s in r["skipped"]}
    assert f"{advice['fidelity']['median_spearman']:.3f}" in reasons[advice["rung"]]
    assert "below min_fix_spearman 0.9" in reasons["strategy:identity"]
    results = _by_gate(evaluate(report.document, Gates()))
    assert not results["status"].passed


def test_a_fix_below_the_gate_fails_min_fix_spearman(tmp_path):
    """The same fix accepted under a lower bar of the user's choosing: healed, and the default gate fails it."""
    from fixtures import load_fixture

    pipeline, _ = load_fixture("eigenvectors_fp16")
    report = diagnose(
        pipeline,
        out_dir=tmp_path,
        progress=False,
        ladders={"dtype-drift": ["strategy:identity"]},
        min_fix_spearman=-1.0,
    )
    assert report.status == "healed"
    fix = report.document["fidelity"]["fix"]
    assert fix["reference"] is not None and fix["method_changed"] is True
    assert fix["median_spearman"] < 0.9
    results = _by_gate(evaluate(report.document, Gates()))
    assert results["status"].passed  # healed under the user's own bar…
    assert not results["min_fix_spearman"].passed  # …but below the default one
    assert results["min_fix_spearman"].value == pytest.approx(fix["median_spearman"])
    assert _by_gate(evaluate(report.document, Gates(min_fix_spearman=-1.0)))["min_fix_spearman"].passed
    assert "min_score_spearman" not in results  # no baseline, no comparison gates


def test_stage_time_fails_only_when_both_ratio_and_difference_exceed_their_limits(two_runs):
    baseline = copy.deepcopy(two_runs[0].document)
    current = copy.deepcopy(baseline)
    assert _by_gate(evaluate(current, Gates(), baseline))["max_seconds_ratio"].passed
    baseline["stages"][1]["seconds"] = 2.0
    current["stages"][1]["seconds"] = 5.0
    gates = Gates(max_seconds_ratio=2.0, min_seconds_difference=2.0)
    assert _by_gate(evaluate(current, Gates(), baseline))["max_seconds_ratio"].passed  # +3 s: within the default
    result = _by_gate(evaluate(current, gates, baseline))["max_seconds_ratio"]
    assert not result.passed and result.value == pytest.approx(2.5) and "covariance" in result.detail
    assert "+3 s" in result.detail
    # The case: a one-second stage a busy neighbour slows ×2.7 is +1.7 s: noise, not a regression.
    baseline["stages"][1]["seconds"], current["stages"][1]["seconds"] = 1.0, 2.677
    noisy = _by_gate(evaluate(current, gates, baseline))["max_seconds_ratio"]
    assert noisy.passed and noisy.value == pytest.approx(2.677) and "+1.68 s" in noisy.detail


def test_stage_time_at_exactly_both_limits_passes_and_just_past_them_fails(two_runs):
    """The README's rule: a stage fails only when it is more than `max_seconds_ratio` times and more than
    `min_seconds_difference` seconds slower (strictly: at the limits it passes)."""
    baseline = copy.deepcopy(two_runs[0].document)
    current = copy.deepcopy(baseline)
    gates = Gates(max_seconds_ratio=2.0, min_seconds_difference=5.0)
    baseline["stages"][1]["seconds"], current["stages"][1]["seconds"] = 5.0, 10.0  # ×2 and +5 s exactly
    assert _by_gate(evaluate(current, gates, baseline))["max_seconds_ratio"].passed
    current["stages"][1]["seconds"] = 10.001  # past both
    assert not _by_gate(evaluate(current, gates, baseline))["max_seconds_ratio"].passed
    baseline["stages"][1]["seconds"], current["stages"][1]["seconds"] = 5.0, 10.5
    assert not _by_gate(evaluate(current, gates, baseline))["max_seconds_ratio"].passed
    baseline["stages"][1]["seconds"], current["stages"][1]["seconds"] = 6.0, 11.5  # +5.5 s but ×1.92
    assert _by_gate(evaluate(current, gates, baseline))["max_seconds_ratio"].passed


def test_the_readme_s_configuration_example_shows_the_defaults():
    """Docs match defaults: every gate the README's pyproject example sets is set to its default."""
    import dataclasses
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("[tool.influence-doctor.gates]", 1)[1].split("[tool.influence-doctor.thresholds]", 1)[0]
    defaults = {f.name: f.default for f in dataclasses.fields(Gates)}
    shown = dict(re.findall(r"^(\w+) = ([^#\n]+?)\s*(?:#.*)?$", block, flags=re.MULTILINE))
    assert {"max_seconds_ratio", "min_seconds_difference", "min_score_spearman"} <= set(shown)
    for name, text in shown.items():
        value = {"true": True, "false": False}.get(text, text.strip('"'))
        if isinstance(defaults[name], float):
            value = float(value)
        assert value == defaults[name], (name, text, defaults[name])


def test_a_baseline_from_another_machine_is_not_comparable_never_a_failure(two_runs):
    baseline = copy.deepcopy(two_runs[0].document)
    current = copy.deepcopy(baseline)
    current["stages"][1]["seconds"] = 100.0  # as if ×1000 slower: raw seconds from two machines say nothing
    baseline["environment"]["machine"]["cpu_model"] = "Some Laptop CPU @ 1.1GHz"
    result = _by_gate(evaluate(current, Gates(), baseline))["max_seconds_ratio"]
    assert result.passed and result.value == "not comparable"
    assert result.detail.startswith("not comparable: baseline from Some Laptop CPU @ 1.1GHz")
    del baseline["environment"]["machine"]  # an old baseline that names no machine
    assert _by_gate(evaluate(current, Gates(), baseline))["max_seconds_ratio"].value == "not comparable"


def test_every_report_names_its_machine_and_how_fast_it_was(two_runs):
    environment = two_runs[0].document["environment"]
    machine = environment["machine"]
    assert machine["cpu_model"] and machine["cpu_cores"] >= 1 and machine["gpu_name"] is None
    assert environment["torch"] and "cuda_version" in environment
    assert set(environment["speed"]) == {"matmul_ms", "eigh_ms"}
    assert all(0.0 < value < 1000.0 for value in environment["speed"].values())


def test_the_doctors_overhead_is_a_gate_when_asked(two_runs):
    document = two_runs[1].document
    timing = document["pipeline"]["timing"]
    assert timing["kronfluence_seconds"] > 0 and timing["overhead_ratio"] == pytest.approx(
        timing["doctor_seconds"] / timing["kronfluence_seconds"]
    )
    assert _by_gate(evaluate(document, Gates()))["max_overhead_ratio"].passed  # not set: not gated
    held = _by_gate(evaluate(document, Gates(max_overhead_ratio=timing["overhead_ratio"] / 2)))["max_overhead_ratio"]
    assert not held.passed


class SlowRegression(small_pipeline().task.__class__):
    """kronfluence's batches (16 examples) take `pause` seconds longer: a real slowdown in the Task."""

    def __init__(self, pause: float) -> None:
        super().__init__()
        self.pause = pause

    def compute_train_loss(self, batch, model, sample=False):
        if len(batch[0]) >= 16:
            import time

            time.sleep(self.pause)
        return super().compute_train_loss(batch, model, sample)


def test_a_real_slowdown_still_fails_the_timing_gate(tmp_path):
    """A sleep in the Task's loss: each kronfluence stage takes ~1.2 s in the baseline and ~8 s now (four
    batches of 16), past both default limits; the train stage (the user's loop) is not timed."""
    runs = [
        diagnose(
            small_pipeline(task=SlowRegression(pause), scores=("pairwise",), train=None),
            out_dir=tmp_path,
            progress=False,
            probe_examples=0,
            fix=False,
        )
        for pause in (0.3, 2.0)
    ]
    result = _by_gate(evaluate(runs[1].document, Gates(), runs[0].document))["max_seconds_ratio"]
    assert not result.passed and result.value > 2.0 and "train" not in result.detail


def test_compare_pairs_out_folders_by_pipeline_and_names_the_runs(cli, tmp_path):
    from tests.pipelines import small_twin

    for side in ("before", "after"):
        for pipeline in (small_pipeline(), small_twin()):
            diagnose(pipeline, out_dir=tmp_path / side, progress=False, probe_examples=0)
    newest = diagnose(small_pipeline(), out_dir=tmp_path / "after", progress=False, probe_examples=0)
    result = cli("compare", str(tmp_path / "before"), str(tmp_path / "after"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "== small: " in result.stdout and "== small-twin: " in result.stdout
    assert str(newest.json_path) in result.stdout  # the latest run of each pipeline is the one taken
    assert "PASS: 2 pipeline(s) paired (small pass, small-twin pass)" in result.stdout
    as_json = json.loads(cli("compare", str(tmp_path / "before"), str(tmp_path / "after"), "--format", "json").stdout)
    assert [pair["pipeline"] for pair in as_json["pairs"]] == ["small", "small-twin"]
    empty = cli("compare", str(tmp_path / "before"), str(tmp_path / "nothing-here"))
    assert empty.returncode == 2 and "Traceback" not in empty.stderr


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
    document = json.loads(failed.stdout)
    assert set(document) == {"passed", "identical_apart_from_timings", "differences", "gates"}
    verdicts = {g["name"]: g["verdict"] for g in document["gates"]}
    assert verdicts["status"] == "fail" and document["passed"] is False
    assert [d["text"] for d in document["differences"] if d["section"] == "status"] == ["status: healthy → sick"]
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


def test_compare_says_two_runs_of_one_seed_are_identical_apart_from_timings(cli, two_runs):
    first, second = two_runs
    result = cli("compare", str(first.run_dir), str(second.run_dir), "--format", "json")
    document = json.loads(result.stdout)
    assert result.returncode == 0, result.stderr
    assert document["identical_apart_from_timings"] is True, document["differences"]
    assert document["differences"] == [] and document["passed"] is True
    text = cli("compare", str(first.run_dir), str(second.run_dir))
    assert "identical apart from timings" in text.stdout


def test_compare_lists_what_a_different_seed_changed(cli, two_runs, tmp_path):
    other = diagnose(small_pipeline(), out_dir=tmp_path, progress=False, probe_examples=0, seed=1)
    result = cli("compare", str(two_runs[0].run_dir), str(other.run_dir), "--format", "json")
    document = json.loads(result.stdout)
    assert document["identical_apart_from_timings"] is False
    sections = {d["section"] for d in document["differences"]}
    assert "scores" in sections, sections
    digests = [d for d in document["differences"] if d["path"] == "scores.pairwise.digest"]
    assert digests and digests[0]["baseline"] == two_runs[0].document["scores"]["pairwise"]["digest"]
    agreement = [d for d in document["differences"] if d["change"] == "rank agreement"]
    assert {d["path"] for d in agreement} == {"scores.pairwise", "scores.self"}
    assert all(-1.0 <= d["current"] < 1.0 for d in agreement)
    seed = [d for d in document["differences"] if d["path"].endswith("config.seed")]
    assert seed and (seed[0]["baseline"], seed[0]["current"]) == (two_runs[0].document["config"]["seed"], 1)
    text = cli("compare", str(two_runs[0].run_dir), str(other.run_dir))
    assert "difference(s) apart from timings" in text.stdout and "scores.pairwise" in text.stdout


def test_report_paths_are_relative_to_the_reports_directory(two_runs):
    pipeline = two_runs[0].document["pipeline"]
    assert pipeline["run_dir"] == f"small/{two_runs[0].run_dir.name}"
    assert pipeline["analysis_dir"] == f"small/{two_runs[0].run_dir.name}/kronfluence"
    text = two_runs[0].json_path.read_text()
    assert str(two_runs[0].run_dir.parent.parent) not in text
