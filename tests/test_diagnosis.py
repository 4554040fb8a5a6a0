"""The diagnosis machinery: symptoms from findings, the cause table, presumptive naming without a model,
and an allocator failure recognised as out-of-memory through the real runner."""

from __future__ import annotations

import pytest
import torch
from kronfluence.arguments import FactorArguments, ScoreArguments

from influence_doctor import diagnose
from influence_doctor.causes import CAUSES, TAGS, Context
from influence_doctor.causes import suspects as rows_for
from influence_doctor.demos.uci_mlp import RegressionTask
from influence_doctor.diagnosis import StageView, diagnose_findings
from influence_doctor.diagnosis.symptoms import OUT_OF_MEMORY, Symptom, find_symptoms
from influence_doctor.findings import Finding
from tests.pipelines import small_pipeline

FP16, BF16, FP32, FP64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


def fail(check, stage, cause=None, subject="m", severity="fail"):
    return Finding(check, stage, subject, severity, 1.0, 0.0, cause, f"{check} failed")


def view(name, findings, status="fail", error=None):
    return StageView(name, status, findings, error)


# ---------------------------------------------------------------------------------------------- symptoms


def test_symptoms_are_measured_failures_grouped_by_kind_and_stage_in_pipeline_order():
    views = [
        view(
            "pairwise_scores", [fail("scores.finite", "pairwise_scores"), fail("scores.precision", "pairwise_scores")]
        ),
        view(
            "covariance",
            [fail("covariance.finite", "covariance"), fail("covariance.finite", "covariance", subject="n")],
        ),
        view("eigendecomposition", [fail("eigendecomposition.condition", "eigendecomposition", severity="warn")]),
        view("train", [fail("train.oscillation", "train", cause="training-oscillating")]),
    ]
    symptoms = find_symptoms(views)
    assert [(s.kind, s.stage) for s in symptoms] == [
        ("training", "train"),
        ("nonfinite", "covariance"),
        ("nonfinite", "pairwise_scores"),
        ("disagreement", "pairwise_scores"),
    ]
    assert len(symptoms[1].findings) == 2  # both modules' inf/NaN are one symptom
    assert all(f.severity == "fail" for s in symptoms for f in s.findings)  # warnings are hypotheses, not symptoms


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ({"type": "torch.OutOfMemoryError", "message": "CUDA out of memory. Tried to allocate 2.00 GiB"}, "oom"),
        ({"type": "MemoryError", "message": ""}, "oom"),
        ({"type": "RuntimeError", "message": "DefaultCPUAllocator: can't allocate memory: you tried 8 GB"}, "oom"),
        ({"type": "RuntimeError", "message": "[enforce fail at alloc_cpu.cpp:117] not enough memory"}, "oom"),
        ({"type": "torch._C._LinAlgError", "message": "linalg.eigh: The algorithm failed to converge"}, "raised"),
    ],
)
def test_stage_errors_are_raised_or_out_of_memory_on_cpu_and_gpu(error, kind):
    (symptom,) = find_symptoms([view("covariance", [fail("covariance.raised", "covariance")], "error", error)])
    assert symptom.kind == kind
    assert bool(OUT_OF_MEMORY.search(f"{error['type']} {error['message']}")) is (kind == "oom")


# ------------------------------------------------------------------------------------------ cause table


def test_every_rule_names_a_known_cause_and_suggests_known_kinds():
    from influence_doctor.diagnosis.symptoms import MEASUREMENTS

    for row in CAUSES:
        assert row.tag in TAGS
        assert row.suggested_by <= set(MEASUREMENTS)


def context(fa=None, sa=None, score_stage="pairwise_scores"):
    return Context(fa or FactorArguments(), sa or ScoreArguments(), score_stage)


def suspects(kind, stage, ctx):
    symptom = Symptom(kind, stage, (fail(f"{stage}.x", stage),))
    return [(h.cause, h.stage, h.setting) for row in rows_for(kind) for h in row.hypotheses_for(symptom, ctx)]


def test_overflow_is_suspected_only_where_a_float16_setting_feeds_the_stage_upstream_first():
    ctx = context(FactorArguments(amp_dtype=FP16, lambda_dtype=FP16), ScoreArguments(score_dtype=FP16))
    found = [s for s in suspects("nonfinite", "pairwise_scores", ctx) if s[0] == "fp16-overflow"]
    assert found == [
        ("fp16-overflow", "covariance", "amp"),
        ("fp16-overflow", "lambda", "lambda"),
        ("fp16-overflow", "pairwise_scores", "scores"),
    ]
    covariance = [s for s in suspects("nonfinite", "covariance", ctx) if s[0] == "fp16-overflow"]
    assert covariance == [("fp16-overflow", "covariance", "amp")]  # lambda and scores come later
    assert not [s for s in suspects("nonfinite", "covariance", context()) if s[0] == "fp16-overflow"]


def test_kfac_fits_no_lambda_so_lambda_precision_is_never_a_suspect():
    ctx = context(FactorArguments(strategy="kfac", lambda_dtype=FP16))
    assert not [s for s in suspects("disagreement", "pairwise_scores", ctx) if s[2] == "lambda"]


def test_damping_is_suspected_only_for_scores_and_only_after_float64_keeps_the_failure():
    score = [s for s in suspects("nonfinite", "pairwise_scores", context()) if s[0] == "tiny-damping"]
    assert score == [("tiny-damping", "pairwise_scores", "damping")]
    assert not [s for s in suspects("nonfinite", "covariance", context()) if s[0] == "tiny-damping"]
    symptom = Symptom("nonfinite", "pairwise_scores", ())
    (row,) = [r for r in rows_for("nonfinite") if r.tag == "tiny-damping"]
    (hypothesis,) = row.hypotheses_for(symptom, context())
    assert list(hypothesis.steps) == [("float64:end-to-end", "persists"), ("damping:x10", "clears")]
    assert not [s for s in suspects("disagreement", "pairwise_scores", context()) if s[0] == "tiny-damping"]


def test_precision_suspects_are_the_groups_below_float64_one_at_a_time():
    ctx = context(FactorArguments(activation_covariance_dtype=BF16), ScoreArguments(score_dtype=BF16))
    found = [s[2] for s in suspects("disagreement", "pairwise_scores", ctx) if s[0] == "low-precision-loss"]
    # One stage at a time (eigendecomposition is float64 by default), then, for a loss spread over
    # stages, every dtype at once: never a strategy change or a damping for a precision problem.
    assert found == ["covariance", "lambda", "scores", "all"]


# ------------------------------------------------------------------------------- presumptive (inspect)


def test_presumptive_diagnosis_names_the_origin_and_marks_it_unconfirmed():
    views = [
        view("covariance", [fail("covariance.finite", "covariance", cause="fp16-overflow")]),
        view("eigendecomposition", [fail("eigendecomposition.raised", "eigendecomposition")], "error"),
        view("pairwise_scores", [fail("scores.finite", "pairwise_scores")]),
    ]
    (problem,) = diagnose_findings(views)
    assert (problem.cause, problem.stage) == ("fp16-overflow", "covariance")
    assert {f.check for f in problem.evidence} == {"covariance.finite", "eigendecomposition.raised", "scores.finite"}
    assert not problem.confirmed and "not confirmed" in problem.message
    assert problem.to_dict()["experiments"] == [] and problem.to_dict()["basis"] == "presumption"


# ------------------------------------------------------- an allocator failure, raised once inside kronfluence


class RunsOutOfMemoryOnce(RegressionTask):
    """The first covariance pass fails with the CPU allocator's own message; later passes go through.

    This checks the recognition and the ladder, not that a partition relieves memory: any re-run
    would "heal" a failure raised once (a real allocation limit a partition relieves is not practical
    to build around a torch process on the CPU)."""

    def __init__(self) -> None:
        self.failed = False

    def compute_train_loss(self, batch, model, sample=False):
        if sample and not self.failed:
            self.failed = True
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes.")
        return super().compute_train_loss(batch, model, sample)


def test_an_allocator_failure_is_diagnosed_out_of_memory_and_climbs_the_memory_ladder_first(tmp_path):
    report = diagnose(small_pipeline(task=RunsOutOfMemoryOnce()), out_dir=tmp_path, progress=False)
    (problem,) = report.document["pipeline"]["diagnosis"]
    assert (problem["cause"], problem["stage"], problem["confirmed"]) == ("out-of-memory", "covariance", True)
    assert problem["basis"] == "direct measurement" and problem["experiments"] == []
    assert report.status == "healed"
    (remedy,) = report.remedies
    assert remedy["rung"] == "partitions:x2" and remedy["outcome"] == "healed"
    assert remedy["rehearsal"]["rehearsed"] is False  # memory depends on the full size, not a subsample
    assert report.prescription["factor_args"]["covariance_module_partitions"] == 2


def test_with_the_probes_off_causes_are_presumed_and_said_to_be_unconfirmed(tmp_path):
    from fixtures import load_fixture

    report = diagnose(load_fixture("eigenvectors_fp16")[0], out_dir=tmp_path, progress=False, probe_examples=0)
    (problem,) = report.document["pipeline"]["diagnosis"]
    assert problem["cause"] == "dtype-drift" and problem["confirmed"] is False and problem["experiments"] == []
    assert "probes are off" in problem["message"]
    (remedy,) = report.remedies
    assert remedy["rehearsal"] == {"rehearsed": False, "reason": "the probes are off"}
    assert report.status == "healed"
