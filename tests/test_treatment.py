"""Treatment that composes and is never worse than the problem, on a pipeline of the kind users bring:
fp16 covariances that overflow, then a float32 eigendecomposition too coarse for a rank-deficient
covariance. Every fix is measured against float64 of the configuration as given."""

from __future__ import annotations

import pytest

from fixtures import load_fixture
from influence_doctor import diagnose


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    pipeline, _ = load_fixture("fp16_overflow_duplicated_features")
    return diagnose(pipeline, out_dir=tmp_path_factory.mktemp("composed"), progress=False)


def test_a_rung_that_reveals_a_second_problem_is_kept_and_the_second_is_treated_on_top(composed):
    assert composed.status == "healed", [(p.cause, p.stage, p.message) for p in composed.problems]
    applied = [r for r in composed.remedies if r["outcome"] != "exhausted"]
    first, *rest = applied
    assert (first["cause"], first["rung"], first["outcome"]) == ("fp16-overflow", "dtype:float32", "resolved")
    assert first["rehearsal"]["heals"] is True and first["rehearsal"]["revealed"]
    assert first["revealed"], "the disagreement the overflow hid is on record"
    assert rest and rest[-1]["outcome"] == "healed"
    # the revealed problem was diagnosed by the same table and experiments, and says what revealed it
    revealed = [p for p in composed.document["pipeline"]["diagnosis"] if p.get("revealed_by")]
    assert revealed and revealed[0]["revealed_by"] == "dtype:float32"
    assert revealed[0]["experiments"] and revealed[0]["experiments"][-1]["verdict"].startswith("confirms")
    assert "Treatment: fp16-overflow → dtype:float32 → revealed" in (composed.run_dir / "report.md").read_text()
    assert "Treatment: fp16-overflow → dtype:float32 → revealed" in (composed.run_dir / "report.html").read_text()


def test_the_composed_fix_changes_dtypes_only_and_agrees_with_float64_as_configured(composed):
    prescription = composed.prescription
    assert prescription["factor_args"] and all(k.endswith("_dtype") for k in prescription["factor_args"])
    assert all(k.endswith("_dtype") for k in prescription["score_args"])  # damping is the user's: untouched
    assert prescription["factor_args"]["activation_covariance_dtype"] in ("float32", "float64")
    assert prescription["factor_args"]["eigendecomposition_dtype"] == "float64"
    assert "strategy" not in prescription["factor_args"]
    fix = composed.document["fidelity"]["fix"]
    assert fix["reference"] == "float64 as configured" and fix["reference_kind"] == "float64"
    assert fix["median_spearman"] >= 0.99 and fix["method_changed"] is False
    assert fix["examples"] > 0 and fix["queries"] > 0
    assert fix["reference_regularization"]["damping_factor"] == 1e-8


def test_when_only_a_strategy_change_finishes_the_pipeline_stays_sick_with_advice(tmp_path):
    """No dtype rung on the ladder: K-FAC still overflows and diagonal finishes, but diagonal computes
    another quantity whose rankings are far from float64 EK-FAC: advice with its cost, never a cure."""
    pipeline, _ = load_fixture("fp16_overflow_duplicated_features")
    report = diagnose(pipeline, out_dir=tmp_path, progress=False, ladders={"fp16-overflow": []})
    assert report.status == "sick"
    assert not [r for r in report.remedies if r["outcome"] != "exhausted"]
    assert "python" not in report.prescription or not report.prescription.get("python")
    (advice,) = report.prescription["advice"]
    assert advice["cause"] == "fp16-overflow" and advice["rung"] in ("strategy:diagonal", "strategy:identity")
    assert advice["method_changed"] is True
    assert advice["fidelity"]["reference"] == "float64 as configured"
    assert advice["fidelity"]["median_spearman"] < 0.9
    skipped = {s["rung"]: s["reason"] for r in report.remedies for s in r["skipped"]}
    assert "below min_fix_spearman" in skipped[advice["rung"]]
    text = (report.run_dir / "report.md").read_text()
    assert "Advice" in text and "a different method" in text
    page = (report.run_dir / "report.html").read_text()
    assert "id='advice'" in page and advice["rung"] in page


def test_a_rung_that_makes_a_passing_measurement_fail_on_the_run_is_undone(tmp_path, monkeypatch):
    """Rehearsals can miss what the whole run shows. fp16 scores overflow; the first rung (bfloat16 scores)
    is applied and, on the run, a factor stage that was right before now holds inf (injected here once,
    as a rung that really broke it would leave it). The rung is undone, recorded as rejected with what
    it broke, and the next rung heals from the configuration as it was."""
    from influence_doctor.findings import Finding
    from influence_doctor.remedies import heal as heal_module

    real_apply = heal_module._apply
    calls = []

    def breaking_apply(run, change, *args, **kwargs):
        real_apply(run, change, *args, **kwargs)
        calls.append(change.rung)
        if len(calls) == 1:
            broken = Finding("lambda.finite", "lambda", "0/lambda_matrix", "fail", 1.0, 0.0, None, "inf in Λ.")
            run.stages["lambda"].findings.append(broken)

    monkeypatch.setattr(heal_module, "_apply", breaking_apply)
    pipeline, _ = load_fixture("fp16_score_overflow")
    report = diagnose(pipeline, out_dir=tmp_path, progress=False)
    first, second = report.remedies[:2]
    assert first["rung"] == "dtype:bfloat16" and first["outcome"] == "rejected"
    assert "lambda (nonfinite)" in first["error"] and "undone" in first["error"]
    assert second["rung"] != first["rung"] and report.status == "healed", report.remedies
    assert not [f for f in report.findings if f.check == "lambda.finite" and f.severity == "fail"]
    # the prescription is the second rung alone: the undone one left no trace
    assert report.prescription["score_args"].get("score_dtype") in ("float32", "float64")


def test_one_cause_at_two_stages_climbs_two_ladders(tmp_path):
    """float16 covariances and a float16 Λ on inputs of standard deviation 64: raising the covariances
    clears their overflow and lets Λ be fitted, which then overflows in turn. The Λ problem, same cause,
    other stage, gets its own ladder from its first rung (bfloat16 is enough for Λ: it stores no
    eigenvectors)."""
    import torch

    from fixtures.fp16_covariance_overflow import covariance_overflow_pipeline

    pipeline = covariance_overflow_pipeline("two-overflows", scale=64.0, examples=512)
    pipeline.factor_args.lambda_dtype = torch.float16
    report = diagnose(pipeline, out_dir=tmp_path, progress=False, examples=None)  # every sum measured, none projected
    assert report.status == "healed", report.remedies
    first, second = [r for r in report.remedies if r["outcome"] != "exhausted"]
    assert (first["rung"], first["outcome"]) == ("dtype:float32", "resolved")
    assert first["revealed"] == ["fp16-overflow at lambda"]
    assert (second["cause"], second["rung"], second["outcome"]) == ("fp16-overflow", "dtype:bfloat16", "healed")
    assert report.prescription["factor_args"] == {
        "activation_covariance_dtype": "float32",
        "gradient_covariance_dtype": "float32",
        "lambda_dtype": "bfloat16",
    }
