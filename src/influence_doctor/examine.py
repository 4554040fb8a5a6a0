"""The checks, declared once per stage, applied to what the stages produced and to what the probes measured.

`STAGE_CHECKS` is the registry: for each stage, the checks that read its artifacts (kronfluence's loaded
dictionaries); every consumer iterates it: the run's stages, each trial an experiment judges, and
`inspect`, which reads kronfluence's files from disk (`examine_artifacts`). `examine_run` builds the run's
stage records: what the executor recorded, the registry's findings under the run's current arguments,
the train stage's checks on the typed `TrainEvidence`, and the probe checks on the probes' measurements;
then the verdicts that rest on more than one measurement (a bound the float64 re-run refutes, the Task's
contract with its measured effect on the rankings, a fix worse than its problem). Pure functions of the
measured numbers do the judging; this module only decides which check reads what.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from influence_doctor.checks.conditioning import check_damped_spectrum
from influence_doctor.checks.contract import check_examples_finite, check_task_contract
from influence_doctor.checks.covariance import check_covariance_sum, check_examples_processed, overflow_prone
from influence_doctor.checks.coverage import check_coverage, check_frozen, check_unsupported
from influence_doctor.checks.damping import check_damping_sensitivity, check_low_rank_cost
from influence_doctor.checks.eigendecomposition import check_eigenpairs
from influence_doctor.checks.headroom import check_projected_headroom
from influence_doctor.checks.hooks import check_hooks
from influence_doctor.checks.lambda_matrix import check_lambda
from influence_doctor.checks.measures import spectrum_extremes
from influence_doctor.checks.outcome import CheckOutcome
from influence_doctor.checks.precision import (
    check_factor_precision,
    check_reference_finite,
    check_score_agreement,
    check_stored_dtypes,
)
from influence_doctor.checks.scores import check_module_dominance, check_query_scale, check_scores, total_scores
from influence_doctor.checks.seed import check_seed
from influence_doctor.checks.sizes import check_module_sizes
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.checks.train import check_loss_curve, check_parameters
from influence_doctor.checks.verdicts import (
    check_fix_fidelity,
    explain_recounted_covariance,
    refute_bounds,
    with_frozen_effect,
    with_measured_effect,
    with_measured_ties,
)
from influence_doctor.findings import SEVERITY_RANK, Finding, fail, warn
from influence_doctor.pipeline import STAGES

STAGE_STATUSES = ("ok", "warn", "fail", "error", "skipped", "not-run", "interrupted")
"""ok/warn/fail: the stage ran and its checks say so; error: it raised; skipped: the strategy does not
need it; not-run: a stage it depends on did not complete; interrupted: the run was stopped inside it."""


@dataclass
class StageRecord:
    """One stage of the run as the report shows it: what the executor recorded, and what the checks found."""

    name: str
    status: str = "not-run"
    seconds: float | None = None
    configured_dtypes: dict[str, str | None] = field(default_factory=dict)
    error: dict[str, str] | None = None  # {"type": qualified exception type, "message": text}
    reason: str | None = None  # why the stage was skipped or not run
    findings: list[Finding] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)  # the kronfluence calls made, in order
    forward_stamps: list[float] = field(default_factory=list, repr=False)  # when each batch entered the model

    @property
    def completed(self) -> bool:
        return self.status in ("ok", "warn", "fail")

    def settle(self) -> None:
        """A completed stage's status is the worst severity among its findings (ok, warn or fail)."""
        if self.completed:
            worst = max((SEVERITY_RANK[f.severity] for f in self.findings), default=0)
            self.status = ("ok", "warn", "fail")[worst]


SCORE_SUBJECTS = {"pairwise_scores": "pairwise", "self_scores": "self"}
FACTOR_KINDS = ("activation", "gradient")


@dataclass
class StageExam:
    """What the checks found in one stage's artifacts, and the numbers they measured per subject."""

    findings: list[Finding] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def add(self, subject: str, outcome: CheckOutcome, section: str = "checks") -> None:
        self.findings += outcome.findings
        if outcome.metrics:
            self.metrics.setdefault(section, {}).setdefault(subject, {}).update(outcome.metrics)


@dataclass(frozen=True)
class Inputs:
    """What an artifact check reads: every stage's artifacts (a later stage reads earlier ones) and the
    arguments they were computed with."""

    stage: str
    artifacts: Mapping[str, Any]
    factor_args: Any
    score_args: Any
    thresholds: Thresholds


ArtifactCheck = Callable[[Inputs], Iterator[tuple[str, CheckOutcome]]]
"""(subject, outcome) pairs of one check on one stage's artifact."""


# --- the registry: artifact checks per stage ------------------------------------------------------------


def covariance_counts(inputs: Inputs) -> Iterator[tuple[str, CheckOutcome]]:
    covariance = inputs.artifacts["covariance"]
    counts = _counts(covariance)
    yield "examples", check_examples_processed(counts["activation"], counts["gradient"])


def covariance_sums(inputs: Inputs) -> Iterator[tuple[str, CheckOutcome]]:
    covariance = inputs.artifacts["covariance"]
    counts = _counts(covariance)
    for kind in FACTOR_KINDS:
        factor = f"{kind}_covariance"
        for module, matrix in covariance[factor].items():
            subject = f"{module}/{factor}"
            count = counts[kind].get(module, 0.0)
            yield subject, check_covariance_sum(matrix, count, subject, inputs.thresholds, inputs.factor_args.amp_dtype)


def eigenpairs(inputs: Inputs) -> Iterator[tuple[str, CheckOutcome]]:
    eigen = inputs.artifacts["eigendecomposition"]
    covariance = inputs.artifacts.get("covariance") or {}
    for kind in FACTOR_KINDS:
        for module, vectors in eigen[f"{kind}_eigenvectors"].items():
            subject = f"{module}/{kind}_eigenvectors"
            covariance_sum = covariance.get(f"{kind}_covariance", {}).get(module)
            normalised = None
            if covariance_sum is not None:
                count = _count(covariance[f"num_{kind}_covariance_processed"][module])
                normalised = covariance_sum.detach().to(torch.float64) / max(count, 1.0)
                normalised = 0.5 * (normalised + normalised.T)  # kronfluence symmetrises before eigh
            yield (
                subject,
                check_eigenpairs(
                    eigen[f"{kind}_eigenvalues"][module],
                    vectors,
                    subject,
                    inputs.thresholds,
                    compute_dtype=inputs.factor_args.eigendecomposition_dtype,
                    source_dtype=None if covariance_sum is None else covariance_sum.dtype,
                    precondition_dtype=inputs.score_args.precondition_dtype,
                    covariance=normalised,
                ),
            )


def kfac_spectrum(inputs: Inputs) -> Iterator[tuple[str, CheckOutcome]]:
    """K-FAC divides by λ_a ⊗ λ_g + δ: its extremes are products of the factors' extremes."""
    if inputs.factor_args.strategy != "kfac":
        return
    eigen = inputs.artifacts["eigendecomposition"]
    score_args = inputs.score_args
    for module in eigen["activation_eigenvalues"]:
        a = spectrum_extremes(eigen["activation_eigenvalues"][module])
        g = spectrum_extremes(eigen["gradient_eigenvalues"][module])
        products = [x * y for x in a[:2] for y in g[:2]]
        yield (
            module,
            check_damped_spectrum(
                min(products),
                max(products),
                a[2] * g[2],
                score_args.damping_factor,
                score_args.precondition_dtype,
                module,
                inputs.stage,
                inputs.thresholds,
            ),
        )


def lambda_matrices(inputs: Inputs) -> Iterator[tuple[str, CheckOutcome]]:
    lambdas = inputs.artifacts["lambda"]
    fa = inputs.factor_args
    low_precision = any(
        dtype is not None and overflow_prone(dtype)
        for dtype in (fa.amp_dtype, fa.per_sample_gradient_dtype, fa.lambda_dtype)
    )
    for module, matrix in lambdas["lambda_matrix"].items():
        subject = f"{module}/lambda_matrix"
        yield (
            subject,
            check_lambda(
                matrix,
                _count(lambdas["num_lambda_processed"][module]),
                subject,
                inputs.thresholds,
                damping_factor=inputs.score_args.damping_factor,
                precondition_dtype=inputs.score_args.precondition_dtype,
                low_precision_inputs=low_precision,
            ),
        )


def score_values(inputs: Inputs) -> Iterator[tuple[str, CheckOutcome]]:
    per_module = inputs.artifacts[inputs.stage]
    subject = SCORE_SUBJECTS[inputs.stage]
    sa = inputs.score_args
    overflow = any(
        dtype is not None and overflow_prone(dtype)
        for dtype in (sa.amp_dtype, sa.score_dtype, sa.per_sample_gradient_dtype, sa.precondition_dtype)
    )
    total = total_scores(per_module)
    tokens = total_scores(per_module, keep_tokens=True)
    per_token = tokens if tokens.ndim > total.ndim else None
    thresholds = inputs.thresholds
    yield subject, check_scores(inputs.stage, subject, total, thresholds, overflow_prone=overflow, per_token=per_token)


def query_scale(inputs: Inputs) -> Iterator[tuple[str, CheckOutcome]]:
    if inputs.stage == "pairwise_scores":
        yield (
            "pairwise",
            check_query_scale(inputs.stage, total_scores(inputs.artifacts[inputs.stage]), inputs.thresholds),
        )


def module_dominance(inputs: Inputs) -> Iterator[tuple[str, CheckOutcome]]:
    per_module = inputs.artifacts[inputs.stage]
    if "all_modules" not in per_module and len(per_module) > 1:
        yield SCORE_SUBJECTS[inputs.stage], check_module_dominance(inputs.stage, per_module, inputs.thresholds)


STAGE_CHECKS: dict[str, tuple[ArtifactCheck, ...]] = {
    "covariance": (covariance_counts, covariance_sums),
    "eigendecomposition": (eigenpairs, kfac_spectrum),
    "lambda": (lambda_matrices,),
    "pairwise_scores": (score_values, query_scale, module_dominance),
    "self_scores": (score_values, module_dominance),
}
"""Every check of what an influence stage produced, by stage, in the order they run."""


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
    for stage, checks in STAGE_CHECKS.items():
        if stage in wanted and artifacts.get(stage):
            exam = exams[stage] = StageExam()
            inputs = Inputs(stage, artifacts, factor_args, score_args, thresholds)
            for check in checks:
                for subject, outcome in check(inputs):
                    exam.add(subject, outcome)
    return exams


def _counts(covariance: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    return {
        kind: {module: _count(value) for module, value in covariance[f"num_{kind}_covariance_processed"].items()}
        for kind in FACTOR_KINDS
    }


def _count(value: Any) -> float:
    """kronfluence stores example counts as 1-element int64 tensors."""
    return float(value.sum().item()) if isinstance(value, torch.Tensor) else float(value)


# --- the train stage: checks on what was measured before any factor ---------------------------------------


def examine_training(evidence: Any, monitor: Any, model: Any, contract: Any, thresholds: Thresholds) -> StageExam:
    """The train stage's checks, each on its part of the `TrainEvidence` record."""
    exam = StageExam()
    exam.add("loss", check_loss_curve(monitor.loss, monitor.validation_loss, thresholds, evidence.sample_loss))
    if contract:
        exam.add("task", check_task_contract(contract, thresholds))
    if (sizes := evidence.preflight) and "modules" in sizes:
        exam.add("preflight", check_module_sizes(sizes, thresholds))
        exam.add("preflight", check_unsupported(sizes))
    if alone := evidence.examples_alone:
        exam.add("examples", check_examples_finite(alone.get("train"), alone.get("query")))
    if evidence.coverage is not None:
        exam.add("coverage", check_coverage(evidence.coverage, thresholds))
    exam.add("frozen", check_frozen(evidence.frozen_tracked, evidence.trained_tracked))
    if model is not None:
        exam.add("parameters", check_parameters(dict(model.named_parameters())))
    if evidence.rank_parameter_drift:
        drift = evidence.rank_parameter_drift
        exam.findings.append(
            warn(
                "train.ranks_agree",
                f"The ranks trained different models (largest parameter difference {drift:.3g}): seed every "
                "rank alike; every rank now analyses rank 0's model.",
                value=drift,
                limit=0.0,
            )
        )
    return exam


# --- the run: its stage records ------------------------------------------------------------------------


class Examiner:
    """Builds the run's stage records; what a stage's own checks found is kept per stage result and
    configuration, so re-examining after a probe or a rung re-runs only the checks whose inputs changed."""

    def __init__(self, run: Any, thresholds: Thresholds | None = None) -> None:
        self.run = run
        self.thresholds = thresholds or Thresholds()
        self._own: dict[tuple[int, str], tuple[Any, Any]] = {}
        self._probed: tuple[Any, list[tuple[str, str, CheckOutcome, str]]] | None = None
        self.seed: Any = None  # the rankings against a second sampling seed (audit/seed.py), measured once

    def verdict(self, result: Any) -> str:
        """A stage's status once its own checks ran (the progress line's)."""
        return self._record(result, _artifacts(self.run.stage_results())).status

    def examine(self, probes: Any = None, fix: Mapping[str, Any] | None = None, merge: bool = True) -> None:
        """The run's stage records, from its stage results, their checks, the probes' measurements and
        the measured cost of the fix. `merge=False` takes no collective under torchrun (a stopped run,
        whose other ranks may not be here)."""
        run = self.run
        results = run.stage_results()
        artifacts = _artifacts(results)
        stages = {}
        for name in STAGES:
            result = results.get(name)
            stages[name] = self._record(result, artifacts, merge) if result is not None else StageRecord(name)
            stages[name].configured_dtypes = configured_dtypes(run.configuration, name) if name != "train" else {}
        if probes is not None:
            if self._probed is None or self._probed[0] is not probes:  # judged once per measurement
                self._probed = (probes, list(probes_outcomes(probes, run.train_examples_total, self.thresholds)))
            for stage, subject, outcome, section in self._probed[1]:
                record = stages[stage]
                record.findings = [*record.findings, *outcome.findings]
                if outcome.metrics:
                    record.metrics.setdefault(section, {}).setdefault(subject, {}).update(outcome.metrics)
            if probes.refutes_bounds is not None:
                for record in stages.values():
                    record.findings = refute_bounds(record.findings, probes.refutes_bounds)
            if probes.batch_effect is not None:
                stages["train"].findings = with_measured_effect(stages["train"].findings, probes.batch_effect)
            if probes.frozen_effect is not None:
                stages["train"].findings = with_frozen_effect(stages["train"].findings, probes.frozen_effect)
            if probes.hooks is not None:
                record = stages["covariance"]
                record.findings = explain_recounted_covariance(record.findings, probes.hooks, self.thresholds)
                stages["train"].findings = with_measured_ties(stages["train"].findings, probes.hooks)
        if self.seed is not None:
            stage = next((n for n in ("pairwise_scores", "self_scores") if stages[n].completed), None)
            if stage is not None:
                outcome = check_seed(self.seed, stage, self.thresholds)
                stages[stage].findings = [*stages[stage].findings, *outcome.findings]
        if fix is not None:
            stage = next((n for n in ("pairwise_scores", "self_scores") if stages[n].completed), None)
            if stage is not None:
                stages[stage].findings = [*stages[stage].findings, *check_fix_fidelity(stage, fix).findings]
        for record in stages.values():
            record.settle()
        run.stages = stages

    def _record(self, result: Any, artifacts: Mapping[str, Any], merge: bool = True) -> Any:
        """The stage's record: what the executor recorded and what the stage's own checks found (kept per
        result and configuration; under torchrun, merged over the ranks once, when first examined)."""
        from dataclasses import replace

        from influence_doctor import distributed

        run = self.run
        key = (id(result), run.configuration.task if result.name == "train" else run.configuration.key)
        if key not in self._own or self._own[key][0] is not result:
            record = StageRecord(
                result.name,
                status=result.status,
                seconds=result.seconds,
                error=result.error,
                reason=result.reason,
                calls=list(result.calls),
                forward_stamps=list(result.forward_stamps),
            )
            if result.status == "ok":
                exam = self._own_checks(result, artifacts)
                record.findings, record.metrics = list(exam.findings), dict(exam.metrics)
            elif result.status == "error":
                record.findings = [raised(result)]
            if result.status in ("ok", "error") and merge:
                distributed.merge_stage(record)  # under torchrun: every rank's findings, the same on every rank
            self._own[key] = (result, record)
        cached = self._own[key][1]
        record = replace(cached, findings=list(cached.findings), metrics=_copy_metrics(cached.metrics))
        if result.name == "train":
            session = run.session
            measured = session.evidence.to_metrics(
                run.configuration.task, len(session.train_indices), len(session.query_indices)
            )
            record.metrics = {**measured, **record.metrics}
        elif result.status == "ok":
            measured = {"memory": result.memory, "forward_calls": len(result.forward_stamps)}
            record.metrics = {**measured, "stored": result.stored(), **record.metrics}
        record.settle()
        return record

    def _own_checks(self, result: Any, artifacts: Mapping[str, Any]) -> StageExam:
        run = self.run
        if result.name == "train":
            session = run.session
            contract = session.contract(run.configuration)
            return examine_training(session.evidence, session.monitor, session.model, contract, self.thresholds)
        artifacts = {**artifacts, result.name: result.artifact}
        exams = examine_artifacts(artifacts, run.factor_args, run.score_args, self.thresholds, stages=[result.name])
        return exams.get(result.name, StageExam())


def _artifacts(results: Mapping[str, Any]) -> dict[str, Any]:
    """What the run's influence stages produced, by stage."""
    return {name: r.artifact for name, r in results.items() if name != "train" and r.completed and r.artifact}


def _copy_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """A record's metrics, with the per-subject sections copied two levels deep (the probes add to them)."""
    sections = ("checks", "probes")
    return {
        key: {subject: dict(values) for subject, values in value.items()} if key in sections else value
        for key, value in metrics.items()
    }


def raised(result: Any) -> Finding:
    """A stage that raised: a measured failure, with the exception's first line."""
    return fail(f"{result.name}.raised", f"The {result.name} stage raised {result.error_text}", stage=result.name)


def probes_outcomes(
    probes: Any, examples_total: int, thresholds: Thresholds
) -> Iterator[tuple[str, str, CheckOutcome, str]]:
    """(stage, subject, outcome, metrics section) of every check on what the probes measured."""
    for comparison in probes.factor_comparisons:
        outcome = check_factor_precision(
            comparison.configured,
            comparison.reference,
            comparison.subject,
            comparison.stage,
            comparison.dtype,
            thresholds,
        )
        yield comparison.stage, comparison.subject, outcome, "probes"
    for kind, agreement in probes.score_agreements.items():
        stage = f"{kind}_scores"
        whole = probes.whole_rehearsal.get(kind)
        outcome = check_score_agreement(stage, kind, agreement, probes.precision_dtype, thresholds, whole)
        outcome.extend(check_reference_finite(stage, kind, agreement, whole))
        yield stage, kind, outcome, "probes"
    for stage, (configured, stored) in probes.storage.items():
        yield stage, "dtypes", check_stored_dtypes(stage, configured, stored), "probes"
    for headroom in probes.headroom:
        measured = probes.full_size.get(headroom.subject)
        outcome = check_projected_headroom(headroom, thresholds, measured, probes.full_size_unmeasured, examples_total)
        yield headroom.stage, headroom.subject, outcome, "probes"
    for kind, agreement in probes.damping.items():
        stage = f"{kind}_scores"
        yield stage, "damping", check_damping_sensitivity(stage, agreement, thresholds), "probes"
    if probes.low_rank is not None:
        rank, agreement = probes.low_rank
        yield "pairwise_scores", "low_rank", check_low_rank_cost("pairwise_scores", rank, agreement), "probes"
    if probes.hooks is not None:
        yield probes.score_stage, "hooks", check_hooks(probes.hooks, probes.score_stage, thresholds), "probes"


def configured_dtypes(configuration: Any, stage: str) -> dict[str, str | None]:
    """The precision settings that govern each stage, as configured (not as observed)."""
    fa, sa = configuration.factor_args, configuration.score_args
    fields = {
        "covariance": (fa, ("amp_dtype", "activation_covariance_dtype", "gradient_covariance_dtype")),
        "eigendecomposition": (fa, ("eigendecomposition_dtype",)),
        "lambda": (fa, ("amp_dtype", "per_sample_gradient_dtype", "lambda_dtype")),
        "pairwise_scores": (sa, ("amp_dtype", "per_sample_gradient_dtype", "precondition_dtype", "score_dtype")),
        "self_scores": (sa, ("amp_dtype", "per_sample_gradient_dtype", "precondition_dtype", "score_dtype")),
    }[stage]
    args, names = fields
    return {name: _dtype_name(getattr(args, name)) for name in names}


def _dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")
