"""Apply the pure checks to a finished stage's artifacts and set the stage's verdict from them."""

from __future__ import annotations

from influence_doctor.checks.scores import check_scores_finite
from influence_doctor.findings import Finding
from influence_doctor.report.scores import total_scores
from influence_doctor.runner.run import Run, StageRecord

SCORE_SUBJECTS = {"pairwise_scores": "pairwise", "self_scores": "self"}


def examine_stage(run: Run, record: StageRecord) -> list[Finding]:
    """Run every check that applies to `record`'s artifacts; append and return the findings.

    The runner settles the stage's status from the worst severity once this returns.
    """
    findings: list[Finding] = []
    artifact = run.artifacts.get(record.name)
    if record.name in SCORE_SUBJECTS and artifact:
        findings += check_scores_finite(record.name, SCORE_SUBJECTS[record.name], total_scores(artifact))
    record.findings.extend(findings)
    return findings


def overall_status(run: Run) -> str:
    """`sick` when any stage raised, failed its checks or was interrupted; `healthy` otherwise."""
    broken = {"error", "fail", "interrupted"}
    return "sick" if any(record.status in broken for record in run.stages.values()) else "healthy"
