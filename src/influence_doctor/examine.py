"""Apply the pure checks to a stage's artifacts: the one place that knows which check reads what.

`examine_artifacts` works on kronfluence's loaded dictionaries alone (the `inspect` command uses it on
files from disk); `examine_stage` applies it to a stage of a live Run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from influence_doctor.checks.scores import check_scores_finite
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.findings import Finding
from influence_doctor.report.scores import total_scores
from influence_doctor.runner.run import Run, StageRecord

SCORE_SUBJECTS = {"pairwise_scores": "pairwise", "self_scores": "self"}


@dataclass
class StageExam:
    """What the checks found in one stage's artifacts, and the numbers they measured."""

    findings: list[Finding] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def examine_artifacts(
    artifacts: Mapping[str, Any],
    factor_args: Any,
    score_args: Any = None,
    thresholds: Thresholds | None = None,
    stages: Iterable[str] | None = None,
) -> dict[str, StageExam]:
    """Check every stage present in `artifacts` (keys are stage names, values kronfluence's dicts).

    `artifacts["covariance"]` is what `Analyzer.load_covariance_matrices` returns (unnormalised sums
    plus `num_*_processed`), `["eigendecomposition"]`, `["lambda"]` likewise, and the score stages hold
    `{module name or "all_modules": tensor}`. Later stages may read earlier ones (e.g. reconstruction
    error needs the covariance); missing inputs just skip the checks that need them.
    """
    thresholds = thresholds or Thresholds()
    wanted = set(stages) if stages is not None else set(artifacts)
    exams: dict[str, StageExam] = {}
    for stage in ("pairwise_scores", "self_scores"):
        if stage in wanted and artifacts.get(stage):
            exam = exams.setdefault(stage, StageExam())
            exam.findings += check_scores_finite(stage, SCORE_SUBJECTS[stage], total_scores(artifacts[stage]))
    return exams


def examine_stage(run: Run, record: StageRecord, thresholds: Thresholds | None = None) -> list[Finding]:
    """Run every check that applies to `record`'s artifacts; append findings and metrics to it.

    The runner settles the stage's status from the worst severity once this returns.
    """
    exam = examine_artifacts(run.artifacts, run.factor_args, run.score_args, thresholds, stages=[record.name])
    found = exam.get(record.name, StageExam())
    record.findings.extend(found.findings)
    record.metrics.update(found.metrics)
    return found.findings


def overall_status(run: Run) -> str:
    """`sick` when any stage raised, failed its checks or was interrupted; `healthy` otherwise."""
    broken = {"error", "fail", "interrupted"}
    return "sick" if any(record.status in broken for record in run.stages.values()) else "healthy"
