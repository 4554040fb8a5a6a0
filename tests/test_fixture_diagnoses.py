"""The regression harness: every fixture gets its cause and stage from an experiment and heals by the
expected rung (or stays sick when no factor setting can fix it), through the real runner; every healthy
control stays healthy with no remedy, whatever its damping."""

from __future__ import annotations

import pytest
import torch

from fixtures import FIXTURES, load_fixture
from fixtures.healthy_conv_default_damping import healthy_conv_default_damping
from influence_doctor import diagnose

SICK = sorted(name for name in FIXTURES if load_fixture(name)[1]["cause"] is not None)
HEALTHY = sorted(name for name in FIXTURES if load_fixture(name)[1]["cause"] is None)


def test_the_harness_has_both_kinds_and_every_expected_rung_is_a_rung():
    from influence_doctor.causes import ladder_for

    assert len(SICK) >= 8 and len(HEALTHY) >= 3
    for name in SICK:
        expected = load_fixture(name)[1]
        if expected["rung"] is not None:
            assert expected["rung"] in ladder_for(expected["cause"]), name


@pytest.mark.parametrize("name", SICK)
def test_fixture_is_diagnosed_with_its_root_cause_by_an_experiment(name, tmp_path):
    pipeline, expected = load_fixture(name)
    report = diagnose(pipeline, fix=False, out_dir=tmp_path, progress=False)
    assert report.status == "sick"
    assert report.remedies == []
    first = report.problems[0]
    assert (first.cause, first.stage) == (expected["cause"], expected["stage"]), [
        (p.cause, p.stage, p.message) for p in report.problems
    ]
    # the whole diagnosis, not only its first line: no extra wrong cause may ride along
    wanted = {(expected["cause"], expected["stage"]), *map(tuple, expected.get("also", []))}
    assert {(p.cause, p.stage) for p in report.problems} == wanted, [(p.cause, p.stage) for p in report.problems]
    assert len(report.problems) == len(wanted)
    assert first.confirmed
    if first.treatable:  # a broken model is measured directly; everything else by a one-setting experiment
        assert first.basis == "experiment"
        assert first.experiments and first.experiments[-1].verdict == f"confirms {expected['cause']}"
    else:
        assert first.basis == "direct measurement"
    # The stage entry of report.json carries the problem rooted there, with its experiments.
    stage = next(s for s in report.document["stages"] if s["name"] == expected["stage"])
    (entry,) = [p for p in stage["problems"] if p["cause"] == expected["cause"]]
    assert entry["experiments"] == [e.to_dict() for e in first.experiments]


@pytest.mark.parametrize("name", SICK)
def test_fixture_heals_by_the_expected_rung(name, tmp_path):
    pipeline, expected = load_fixture(name)
    report = diagnose(pipeline, out_dir=tmp_path, progress=False)
    if expected["rung"] is None:
        # No factor setting can fix a broken model: no rung is tried, the advice is about training.
        assert report.status == "sick"
        assert report.remedies == []
        assert "learning rate" in report.problems[0].message
        return
    assert report.status == "healed", [(p.cause, p.stage, p.message) for p in report.problems]
    resolving = [
        r for r in report.remedies if r["cause"] == expected["cause"] and r["outcome"] in ("resolved", "healed")
    ]
    assert resolving and resolving[0]["rung"] == expected["rung"], report.remedies
    assert report.prescription["python"]
    fix = report.document["fidelity"]["fix"]
    assert fix["reference"] is not None, fix
    if expected["cause"] == "tiny-damping":  # influence as given is undefined: nothing finite to distort
        assert fix["undefined_reference"] is True and fix["median_spearman"] is None
    else:
        assert fix["median_spearman"] >= fix["limit"], fix
    assert fix["examples"] > 0
    if expected["cause"] != "tiny-damping":  # damping is the user's choice unless a tiny damping is proven
        assert "damping_factor" not in report.prescription["score_args"]


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_control_stays_healthy_with_no_remedy(name, tmp_path):
    pipeline, _ = load_fixture(name)
    report = diagnose(pipeline, out_dir=tmp_path, progress=False)
    assert report.status == "healthy", [(p.cause, p.stage, p.message) for p in report.problems]
    assert report.remedies == [] and report.prescription == {}
    assert not [f for f in report.findings if f.severity == "fail"]
    # Damping is a modeling choice: its sensitivity is reported as info, never a warning or a failure.
    sensitivity = [f for f in report.findings if f.check == "scores.damping_sensitivity"]
    assert sensitivity and all(f.severity == "info" for f in sensitivity)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_singular_factors_at_kronfluences_default_damping_are_healthy_under_both_strategies(strategy, tmp_path):
    """A Linear whose 257-wide activation covariance has rank ≤ 64, at damping 1e-8: normal, not sick."""
    pipeline = healthy_conv_default_damping(strategy=strategy)
    assert pipeline.score_args.damping_factor == 1e-8
    report = diagnose(pipeline, out_dir=tmp_path, progress=False)
    assert report.status == "healthy" and report.remedies == []
    rank = [f for f in report.findings if f.cause == "rank-deficient"]
    assert all(f.severity in ("info", "warn") for f in rank)  # a fact about the factor, never a failure
    agreement = report.run.probes["precision"]["pairwise"]
    assert agreement["median_spearman"] > 0.999


def test_probe_only_disagreement_is_the_probes_size_not_a_warning(tmp_path):
    """rank_deficient_inputs: the 64-example probe disagrees with float64, the whole rehearsal does not (at
    identical sampled targets): the probe's size, said as info, not the configured precision."""
    report = diagnose(load_fixture("rank_deficient_inputs")[0], out_dir=tmp_path, progress=False)
    assert report.status == "healthy" and report.remedies == []
    (finding,) = [f for f in report.findings if f.check == "scores.precision" and f.subject == "pairwise"]
    assert finding.severity == "info" and "probe subsample only" in finding.message
    assert "the probe's size" in finding.message
    probes = report.run.probes["precision"]
    assert probes["pairwise"]["median_spearman"] < 0.99 <= probes["pairwise_rehearsal"]["median_spearman"]


@pytest.mark.parametrize(
    "name", ["amp_fp16", "fp16_covariance_overflow", "fp16_score_overflow", "fp16_score_overflow_partial"]
)
def test_float16_overflow_heals_by_dtype_rungs_only_with_the_damping_untouched(name, tmp_path):
    """amp_fp16's eigh raises on the overflowed covariance; the score fixtures lose all or ~2% of their
    scores to inf. Each is fp16-overflow where the inf first appears, and only dtypes change."""
    pipeline, _ = load_fixture(name)
    damping = pipeline.score_args.damping_factor
    report = diagnose(pipeline, out_dir=tmp_path, progress=False)
    assert report.status == "healed"
    assert report.remedies and all(r["rung"].startswith("dtype:") for r in report.remedies)
    assert report.run.score_args.damping_factor == damping
    assert report.document["pipeline"]["diagnosis"][0]["cause"] == "fp16-overflow"


def test_bf16_everywhere_is_caught_by_per_query_rankings_against_float64(tmp_path):
    report = diagnose(load_fixture("bf16_everywhere")[0], fix=False, out_dir=tmp_path, progress=False)
    (problem,) = [p for p in report.problems if p.cause == "low-precision-loss"]
    assert {f.check for f in problem.evidence} >= {"scores.precision"}
    (finding,) = [f for f in problem.evidence if f.check == "scores.precision" and f.subject == "pairwise"]
    assert finding.severity == "fail" and finding.value < 0.99  # median per-query Spearman, measured
    assert all(torch.isfinite(t).all() for t in report.run.artifacts["pairwise_scores"].values())
    # The experiment that convicted the covariance dtypes is recorded with its numbers.
    (experiment,) = [e for e in problem.experiments if e.verdict == "confirms low-precision-loss"][:1]
    assert "covariance_dtype bfloat16 → float64" in experiment.change
    assert experiment.before < 0.99 <= experiment.after


def test_an_overflow_that_only_the_full_run_reaches_is_diagnosed_by_the_rehearsal_and_the_full_run_confirms(
    tmp_path,
):
    """8,192 examples; the default rehearsal (256, a fast run's minimum) keeps the float16 sum far below 65504."""
    pipeline, _ = load_fixture("fp16_covariance_overflow_at_scale")
    rehearsal = diagnose(pipeline, fix=False, out_dir=tmp_path, progress=False)
    sized = rehearsal.document["pipeline"]["rehearsal"]
    assert (sized["examples"], sized["examples_total"], sized["full"]) == (256, 8192, False)
    assert sized["plan"]["examples"] == 256
    assert not [f for f in rehearsal.findings if f.check == "covariance.finite"]  # nothing overflowed yet
    (projection,) = [
        f for f in rehearsal.findings if f.check == "covariance.full_size_overflow" and f.severity == "fail"
    ]
    # The fail rests on a measurement: the covariance stage alone, accumulated over all 8,192 examples
    # in float16, holds inf/NaN where the projection said it would.
    assert projection.value > projection.limit == 0.0 and "measured" in projection.message
    # The pass goes through the data in slices and stops after the first one that leaves a sum non-finite.
    count = rehearsal.run.executor.full_size_counts[0]  # the run's own; then the experiment's
    assert count.total_examples == 8192 and count.examples < count.total_examples
    assert f"after {count.examples} of the 8192 examples (the pass stopped there)" in projection.message
    headroom = rehearsal.run.headroom[projection.subject]
    assert 0.8 < headroom.growth <= 1.0 and headroom.max_rehearsal < 65504.0 < headroom.max_projected
    first = rehearsal.problems[0]
    assert (first.cause, first.stage, first.basis) == ("fp16-overflow", "covariance", "experiment")
    assert "covariance.full_size_overflow" in {f.check for f in first.evidence}
    # ...and so does the experiment that convicts the dtype: the same full-size pass in float32 is finite.
    (experiment,) = [e for e in first.experiments if e.verdict == "confirms fp16-overflow"]
    assert experiment.before == projection.value and experiment.after == 0.0
    # The full run, which the rehearsal did not need, overflows where it said.
    full = diagnose(
        load_fixture("fp16_covariance_overflow_at_scale")[0],
        fix=False,
        out_dir=tmp_path,
        progress=False,
        examples=None,
        probe_examples=0,
    )
    overflowed = [f for f in full.findings if f.check == "covariance.finite"]
    assert [f.subject for f in overflowed] == [projection.subject]
    assert full.problems[0].cause == "fp16-overflow"


def test_a_projected_overflow_the_budget_cannot_measure_is_a_warning_saying_where(tmp_path):
    """No time for one covariance pass over all the data: the projection stays a hypothesis (a warn with
    the size at which it crosses), and nothing is convicted on it."""
    from influence_doctor.checks.thresholds import Thresholds

    thresholds = Thresholds.from_mapping({"overflow_measure_share": 0.0, "overflow_measure_min_seconds": 0.0})
    pipeline, _ = load_fixture("fp16_covariance_overflow_at_scale")
    report = diagnose(pipeline, fix=False, out_dir=tmp_path, progress=False, thresholds=thresholds)
    assert report.run.executor.full_size_counts == []  # nothing accumulated at full size
    projected = [f for f in report.findings if f.check == "covariance.projected_headroom" and f.cause]
    assert projected and all(f.severity == "warn" for f in projected)
    assert any("examples. Not measured: one covariance pass" in f.message for f in projected)
    assert "fp16-overflow" not in {p.cause for p in report.problems}
