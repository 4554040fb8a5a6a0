"""Apply the pure checks to a stage's artifacts: the one place that knows which check reads what.

`examine_artifacts` works on kronfluence's loaded dictionaries alone (the `inspect` command uses it on
files from disk); `examine_stage` applies it to a stage of a live Run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from influence_doctor.checks.conditioning import check_damped_spectrum
from influence_doctor.checks.contract import check_examples_finite, check_task_contract
from influence_doctor.checks.covariance import check_covariance_sum, check_examples_processed, overflow_prone
from influence_doctor.checks.coverage import check_coverage
from influence_doctor.checks.eigendecomposition import check_eigenpairs
from influence_doctor.checks.lambda_matrix import check_lambda
from influence_doctor.checks.measures import spectrum_extremes
from influence_doctor.checks.outcome import CheckOutcome
from influence_doctor.checks.scores import check_module_dominance, check_query_scale, check_scores, total_scores
from influence_doctor.checks.sizes import check_module_sizes
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.checks.train import SampleLoss, check_loss_curve, check_parameters
from influence_doctor.findings import Finding
from influence_doctor.runner.run import Run, StageRecord

SCORE_SUBJECTS = {"pairwise_scores": "pairwise", "self_scores": "self"}
FACTOR_KINDS = ("activation", "gradient")


@dataclass
class StageExam:
    """What the checks found in one stage's artifacts, and the numbers they measured per subject."""

    findings: list[Finding] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def add(self, subject: str, outcome: CheckOutcome) -> None:
        self.findings += outcome.findings
        if outcome.metrics:
            self.metrics.setdefault("checks", {}).setdefault(subject, {}).update(outcome.metrics)


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
    `{module name or "all_modules": tensor}`. Later stages read earlier ones where they need them
    (reconstruction error needs the covariance); missing inputs skip only the checks that need them.
    """
    if score_args is None:
        from kronfluence.arguments import ScoreArguments

        score_args = ScoreArguments()
    thresholds = thresholds or Thresholds()
    wanted = set(stages) if stages is not None else set(artifacts)
    exams: dict[str, StageExam] = {}
    examiners = {
        "covariance": _examine_covariance,
        "eigendecomposition": _examine_eigendecomposition,
        "lambda": _examine_lambda,
        "pairwise_scores": _examine_scores,
        "self_scores": _examine_scores,
    }
    for stage, examiner in examiners.items():
        if stage in wanted and artifacts.get(stage):
            exams[stage] = StageExam()
            examiner(stage, artifacts, factor_args, score_args, thresholds, exams[stage])
    return exams


def _examine_covariance(stage, artifacts, factor_args, score_args, thresholds, exam: StageExam) -> None:
    covariance = artifacts[stage]
    counts = {
        kind: {module: _count(value) for module, value in covariance[f"num_{kind}_covariance_processed"].items()}
        for kind in FACTOR_KINDS
    }
    exam.add("examples", check_examples_processed(counts["activation"], counts["gradient"]))
    for kind in FACTOR_KINDS:
        factor = f"{kind}_covariance"
        for module, matrix in covariance[factor].items():
            subject = f"{module}/{factor}"
            count = counts[kind].get(module, 0.0)
            exam.add(subject, check_covariance_sum(matrix, count, subject, thresholds, factor_args.amp_dtype))


def _examine_eigendecomposition(stage, artifacts, factor_args, score_args, thresholds, exam: StageExam) -> None:
    eigen = artifacts[stage]
    covariance = artifacts.get("covariance") or {}
    for kind in FACTOR_KINDS:
        for module, vectors in eigen[f"{kind}_eigenvectors"].items():
            subject = f"{module}/{kind}_eigenvectors"
            covariance_sum = covariance.get(f"{kind}_covariance", {}).get(module)
            normalised = None
            if covariance_sum is not None:
                count = _count(covariance[f"num_{kind}_covariance_processed"][module])
                normalised = covariance_sum.detach().to(torch.float64) / max(count, 1.0)
                normalised = 0.5 * (normalised + normalised.T)  # kronfluence symmetrises before eigh
            exam.add(
                subject,
                check_eigenpairs(
                    eigen[f"{kind}_eigenvalues"][module],
                    vectors,
                    subject,
                    thresholds,
                    compute_dtype=factor_args.eigendecomposition_dtype,
                    source_dtype=None if covariance_sum is None else covariance_sum.dtype,
                    precondition_dtype=score_args.precondition_dtype,
                    covariance=normalised,
                ),
            )
    if factor_args.strategy == "kfac":
        # K-FAC divides by λ_a ⊗ λ_g + δ: its extremes are products of the factors' extremes.
        for module in eigen["activation_eigenvalues"]:
            a = spectrum_extremes(eigen["activation_eigenvalues"][module])
            g = spectrum_extremes(eigen["gradient_eigenvalues"][module])
            products = [x * y for x in a[:2] for y in g[:2]]
            exam.add(
                module,
                check_damped_spectrum(
                    min(products),
                    max(products),
                    a[2] * g[2],
                    score_args.damping_factor,
                    score_args.precondition_dtype,
                    module,
                    stage,
                    thresholds,
                ),
            )


def _examine_lambda(stage, artifacts, factor_args, score_args, thresholds, exam: StageExam) -> None:
    lambdas = artifacts[stage]
    low_precision = any(
        dtype is not None and overflow_prone(dtype)
        for dtype in (factor_args.amp_dtype, factor_args.per_sample_gradient_dtype, factor_args.lambda_dtype)
    )
    for module, matrix in lambdas["lambda_matrix"].items():
        subject = f"{module}/lambda_matrix"
        exam.add(
            subject,
            check_lambda(
                matrix,
                _count(lambdas["num_lambda_processed"][module]),
                subject,
                thresholds,
                damping_factor=score_args.damping_factor,
                precondition_dtype=score_args.precondition_dtype,
                low_precision_inputs=low_precision,
            ),
        )


def _examine_scores(stage, artifacts, factor_args, score_args, thresholds, exam: StageExam) -> None:
    per_module = artifacts[stage]
    subject = SCORE_SUBJECTS[stage]
    overflow = any(
        dtype is not None and overflow_prone(dtype)
        for dtype in (
            score_args.amp_dtype,
            score_args.score_dtype,
            score_args.per_sample_gradient_dtype,
            score_args.precondition_dtype,
        )
    )
    total = total_scores(per_module)
    tokens = total_scores(per_module, keep_tokens=True)
    per_token = tokens if tokens.ndim > total.ndim else None
    exam.add(subject, check_scores(stage, subject, total, thresholds, overflow_prone=overflow, per_token=per_token))
    if subject == "pairwise":
        exam.add(subject, check_query_scale(stage, total, thresholds))
    if "all_modules" not in per_module and len(per_module) > 1:
        exam.add(subject, check_module_dominance(stage, per_module, thresholds))


def _count(value: Any) -> float:
    """kronfluence stores example counts as 1-element int64 tensors."""
    return float(value.sum().item()) if isinstance(value, torch.Tensor) else float(value)


def examine_stage(run: Run, record: StageRecord, thresholds: Thresholds | None = None) -> list[Finding]:
    """Run every check that applies to `record`'s artifacts; append findings and metrics to it.

    The runner settles the stage's status from the worst severity once this returns.
    """
    thresholds = thresholds or Thresholds()
    if record.name == "train":
        found = StageExam()
        measured = record.metrics.get("sample_loss")
        sample = SampleLoss(**measured) if measured else None
        found.add("loss", check_loss_curve(run.monitor.loss, run.monitor.validation_loss, thresholds, sample))
        if contract := record.metrics.get("task_contract"):
            found.add("task", check_task_contract(contract, thresholds))
        if (sizes := record.metrics.get("preflight")) and "modules" in sizes:
            found.add("preflight", check_module_sizes(sizes, thresholds))
        if alone := record.metrics.get("examples_alone"):
            found.add("examples", check_examples_finite(alone.get("train"), alone.get("query")))
        if coverage := record.metrics.get("coverage"):
            found.add("coverage", check_coverage(coverage, thresholds))
        if run.model is not None:
            found.add("parameters", check_parameters(dict(run.model.named_parameters())))
    else:
        exams = examine_artifacts(run.artifacts, run.factor_args, run.score_args, thresholds, stages=[record.name])
        found = exams.get(record.name, StageExam())
    record.findings.extend(found.findings)
    record.metrics.update(found.metrics)
    return found.findings


def reexamine(run: Run, names: Iterable[str], thresholds: Thresholds | None = None) -> None:
    """Check completed stages again under the run's current arguments (a damping change alters what
    Λ+δ means without re-running the lambda stage); earlier findings of those stages are replaced."""
    from influence_doctor.runner.stages import settle_status

    for name in names:
        record = run.stages[name]
        if not record.completed:
            continue
        record.findings = []
        record.metrics.pop("checks", None)
        record.metrics.pop("probes", None)
        record.status = "ok"
        examine_stage(run, record, thresholds)
        settle_status(record)
