"""The two measurements every diagnosis starts from, taken on the probe subsample (`diagnosis.differential.Labs`):

- precision: the configured settings against float64 end to end at the same damping — per-query
  rankings of the score kinds the pipeline asks for (median and worst Spearman, top-10 overlap,
  relative error) and each factor's relative error. A disagreement is a measured wrong result
  (`fail`); agreement refutes the precision hypotheses the bounds raised (they become `info`).
- damping sensitivity: the rankings again with every module's own damping ×10, reported as `info`:
  damping is the user's modeling choice, the doctor only says how much it matters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from influence_doctor.changes import Target
from influence_doctor.checks.damping import check_damping_sensitivity, check_low_rank_cost
from influence_doctor.checks.headroom import accumulated_maxima, check_projected_headroom, project_headroom
from influence_doctor.checks.outcome import CheckOutcome
from influence_doctor.checks.precision import (
    check_factor_precision,
    check_reference_finite,
    check_score_agreement,
    check_stored_dtypes,
    disagrees,
    score_agreement,
)
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.diagnosis.differential import Labs, counterfactual_trial, reference_for
from influence_doctor.dtypes import score_path_dtype
from influence_doctor.lab import SCORE_STAGE_OF
from influence_doctor.overflow import FullSizeCovariance, affordable
from influence_doctor.runner.run import Run, StageRecord
from influence_doctor.runner.stages import settle_status

PROBE_CHECKS = frozenset(
    {
        "covariance.projected_headroom",
        "lambda.projected_headroom",
        "scores.projected_headroom",
        "covariance.precision",
        "lambda.precision",
        "scores.precision",
        "scores.reference_finite",
        "scores.damping_sensitivity",
        "scores.low_rank_cost",
        "covariance.dtype_drift",
        "lambda.dtype_drift",
    }
)
"""Findings the probes add; they are replaced whenever the probes are taken again."""

REFUTABLE_CHECKS = (".condition", ".effective_rank", ".dead_units")
"""Bound-based hypotheses (conditioning, rank) that a float64 agreement shows to be harmless."""

FACTOR_PRECISION_CHECKS = frozenset({"covariance.precision", "lambda.precision"})
"""A factor's error against float64: it matters only through the scores, so when the user's rankings
agree with float64 it is `info`, not a warning."""


def run_probes(run: Run, labs: Labs, thresholds: Thresholds | None = None, damping: bool = True) -> dict[str, Any]:
    """Take both probes (the damping one only when asked); findings go onto the stages they describe."""
    thresholds = thresholds or Thresholds()
    clear_probe_findings(run)
    summary: dict[str, Any] = {}
    if run.analyzer is None:
        return summary
    if labs.probe is None or not labs.probe.examples:  # no float64 trial, but sums still grow with the data
        summary["headroom"] = measure_headroom(run, labs, thresholds)
        for record in run.stages.values():
            settle_status(record)
        return summary
    bars, run.analyzer.disable_tqdm = run.analyzer.disable_tqdm, True  # probes are quick: no bars
    try:
        summary["precision"] = _timed(lambda: measure_precision(run, labs, thresholds), labs)
        summary["headroom"] = _timed(lambda: measure_headroom(run, labs, thresholds), labs)
        if damping:
            summary["damping"] = _timed(lambda: measure_damping_sensitivity(run, labs, thresholds), labs)
        if getattr(run.score_args, "query_gradient_low_rank", None) and "pairwise" in run.pipeline.scores:
            summary["low_rank"] = _timed(lambda: measure_low_rank_cost(run, labs), labs)
        if _contract_broken(run):
            summary["batch_size"] = _timed(lambda: measure_batch_sensitivity(run, labs), labs)
    finally:
        run.analyzer.disable_tqdm = bars
    summary.update(examples=labs.probe.examples, queries=labs.probe.queries)
    for record in run.stages.values():
        settle_status(record)
    return summary


def _timed(measure: Any, labs: Labs) -> dict[str, Any]:
    spent = labs.seconds
    try:
        result = measure()
    except Exception as exc:  # a probe is a measurement; its failure is reported, never fatal
        text = str(exc).strip()
        result = {"error": f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"}
    result["seconds"] = labs.seconds - spent
    return result


def clear_probe_findings(run: Run) -> None:
    for record in run.stages.values():
        record.findings = [f for f in record.findings if f.check not in PROBE_CHECKS]
        record.metrics.pop("probes", None)


def measure_precision(run: Run, labs: Labs, thresholds: Thresholds) -> dict[str, Any]:
    """Configured vs float64 on the probe: what the configured precision costs, in the user's terms."""
    lab = labs.probe
    configured = lab.configured()
    reference = reference_for(lab, configured)
    result: dict[str, Any] = {"configured_errors": configured.errors, "float64_errors": reference.errors}
    for stage, factors, dtype_field in (
        ("covariance", ("activation_covariance", "gradient_covariance"), None),
        ("lambda", ("lambda_matrix",), "lambda_dtype"),
    ):
        if stage not in configured.artifacts or stage not in reference.artifacts:
            continue
        for factor in factors:
            dtype = getattr(run.factor_args, dtype_field or f"{factor}_dtype")
            for module, tensor in configured.artifacts[stage][factor].items():
                subject = f"{module}/{factor}"
                expected = reference.artifacts[stage][factor][module]
                outcome = check_factor_precision(tensor, expected, subject, stage, dtype, thresholds)
                attach(run.stages[stage], subject, outcome)
    agree = True
    dtype = score_path_dtype(run.factor_args, run.score_args)
    for kind in run.pipeline.scores:
        stage = SCORE_STAGE_OF[kind]
        mine, expected = configured.scores(kind), reference.scores(kind)
        if mine is None or expected is None:
            agree = False
            continue
        agreement = score_agreement(mine, expected)
        result[kind] = agreement
        whole = _whole_rehearsal_agreement(labs, kind) if disagrees(agreement, dtype, thresholds) else None
        if whole is not None:
            result[f"{kind}_rehearsal"] = whole
        score_check = check_score_agreement(stage, kind, agreement, dtype, thresholds, whole)
        finite_check = check_reference_finite(stage, kind, agreement, whole)
        attach(run.stages[stage], kind, score_check.extend(finite_check))
        failed = [f for f in score_check.findings + finite_check.findings if f.severity == "fail"]
        agree = agree and not failed and not agreement["nonfinite"]
    for stage, configured_dtypes in _configured_storage(run).items():
        attach(run.stages[stage], "dtypes", check_stored_dtypes(stage, configured_dtypes, _stored(run, stage)))
    if agree and not configured.errors:
        refute_bounds(run, result)
    result["agrees"] = agree
    return result


def measure_headroom(run: Run, labs: Labs, thresholds: Thresholds) -> dict[str, Any]:
    """Every accumulated quantity's largest magnitude on the probe and on the rehearsal, its measured
    growth, and where it lands at the full size against its dtype's max (fp16 overflow before it happens)."""
    run.headroom = {}
    rehearsed, total = len(run.train_indices), run.train_examples_total
    if rehearsed >= total:
        return {"skipped": "the rehearsal is the full run: its headroom is measured, not projected"}
    queries = max(len(run.query_indices), 1)
    scale = {"covariance": total / rehearsed, "lambda": total / rehearsed, "self_scores": total / rehearsed}
    scale["pairwise_scores"] = total / rehearsed * max(run.query_examples_total, queries) / queries
    probe = labs.probe.configured() if labs.probe is not None else None
    projected = []
    for stage, factor in scale.items():
        small = accumulated_maxima(probe.artifacts, stage) if probe is not None else {}
        for subject, (size, largest, _dtype_max) in accumulated_maxima(run.artifacts, stage).items():
            size_probe, max_probe = small.get(subject, (0.0, 0.0, 0.0))[:2]
            dtype = _stored_dtype(run.artifacts, stage, subject)
            headroom = project_headroom(subject, stage, dtype, (size_probe, max_probe), (size, largest), size * factor)
            run.headroom[subject] = headroom
            projected.append(headroom)
    measured, why = _measure_projected_overflow(run, projected, thresholds)
    for headroom in projected:
        count = measured.get(headroom.subject)
        outcome = check_projected_headroom(headroom, thresholds, count, why, total)
        attach(run.stages[headroom.stage], headroom.subject, outcome)
    summary: dict[str, Any] = {"quantities": len(projected)}
    if run.full_size is not None and run.full_size.counts:
        spent = sum(count.seconds for count in run.full_size.counts.values())
        summary["measured_at_full_size"] = {"examples": total, "subjects": sorted(measured), "seconds": spent}
    return summary


def _measure_projected_overflow(
    run: Run, projected: list[Any], thresholds: Thresholds
) -> tuple[dict[str, tuple[int, int, int, int]], str]:
    """Covariance sums projected past their dtype's max, measured over all the data when one covariance
    pass fits the budget: subject → (non-finite entries, entries, examples accumulated, all examples);
    else why it was not."""
    overflowing = [h for h in projected if h.stage == "covariance" and h.share_projected > 1.0]
    if not overflowing:
        return {}, ""
    share, floor = thresholds.overflow_measure_share, thresholds.overflow_measure_min_seconds
    fits, seconds, budget = affordable(run, share, floor)
    if not fits:
        return {}, f"one covariance pass over all the data would take ~{seconds:.3g} s, over its {budget:.3g} s budget"
    if run.full_size is None:
        run.full_size = FullSizeCovariance(run)
    count = run.full_size.measure(run.factor_args)
    if count.error is not None:
        return {}, f"the covariance pass over all the data raised {count.error}"
    return {
        h.subject: (count.nonfinite[h.subject], count.entries[h.subject], count.examples, count.total_examples)
        for h in overflowing
        if h.subject in count.nonfinite
    }, ""


def _stored_dtype(artifacts: dict[str, Any], stage: str, subject: str) -> torch.dtype:
    if stage in ("pairwise_scores", "self_scores"):
        return next(iter(artifacts[stage].values())).dtype
    module, _, factor = subject.rpartition("/")
    return artifacts[stage][factor][module].dtype


def _whole_rehearsal_agreement(labs: Labs, kind: str) -> dict[str, float] | None:
    """The probe disagreed: the same comparison on the whole rehearsal (its float64 run costs a full
    pass, paid only on this sick path), or None when the probe already is the whole rehearsal."""
    lab = labs.rehearsal
    if lab is None or labs.probe.covers_run:
        return None
    configured = lab.configured()
    mine, expected = configured.scores(kind), reference_for(lab, configured).scores(kind)
    return None if mine is None or expected is None else score_agreement(mine, expected)


def refute_bounds(run: Run, result: dict[str, Any]) -> None:
    """The float64 re-run agrees: the conditioning and rank warnings were hypotheses, and they are
    refuted; a factor's own distance from float64 does not reach the rankings. They stay in the report
    as `info`, saying why."""
    spearman = [a["median_spearman"] for a in result.values() if isinstance(a, dict) and "median_spearman" in a]
    finite = [v for v in spearman if not math.isnan(v)]
    worst = min(finite) if finite else math.nan
    note = f" — refuted: float64 at the same damping agrees (median per-query Spearman {worst:.4f})."
    unseen = f" — the scores do not show it: float64 at the same damping ranks alike (median Spearman {worst:.4f})."
    for record in run.stages.values():
        record.findings = [
            dataclasses.replace(f, severity="info", message=f.message.rstrip(".") + note)
            if f.severity == "warn" and f.check.endswith(REFUTABLE_CHECKS)
            else dataclasses.replace(f, severity="info", message=f.message.rstrip(".") + unseen)
            if f.severity == "warn" and f.check in FACTOR_PRECISION_CHECKS
            else f
            for f in record.findings
        ]


def measure_damping_sensitivity(run: Run, labs: Labs, thresholds: Thresholds) -> dict[str, Any]:
    """Rankings with every module's own damping ×10 against the configured ones, as `info`."""
    lab = labs.probe
    base = lab.configured()
    if base.errors:
        return {"skipped": "the configured settings did not complete on the probe"}
    # The rankings a user reads: pairwise when computed (self otherwise); one kind keeps the probe cheap
    # when every module needs its own scoring pass (the heuristic damping differs per module).
    kinds = ("pairwise",) if "pairwise" in run.pipeline.scores else ("self",)
    raised, why = counterfactual_trial(lab, base, "damping:x10-exact", Target("pairwise_scores", "damping"), kinds)
    if raised is None:
        return {"skipped": why}
    result: dict[str, Any] = {"damping": raised.damping}
    for kind in kinds:
        before, after = base.scores(kind), raised.scores(kind)
        if before is None or after is None:
            continue
        agreement = score_agreement(after, before)
        result[kind] = agreement
        attach(
            run.stages[SCORE_STAGE_OF[kind]],
            "damping",
            check_damping_sensitivity(SCORE_STAGE_OF[kind], agreement, thresholds),
        )
    return result


def measure_low_rank_cost(run: Run, labs: Labs) -> dict[str, Any]:
    """Pairwise rankings with the configured low-rank query gradients against full rank, as `info`."""
    lab = labs.probe
    base = lab.configured()
    if base.errors:
        return {"skipped": "the configured settings did not complete on the probe"}
    full_args = dataclasses.replace(run.score_args, query_gradient_low_rank=None)
    full = lab.trial(
        run.factor_args, full_args, label="full-rank query gradients", shift=run.shift, kinds=("pairwise",)
    )
    low, exact = base.scores("pairwise"), full.scores("pairwise")
    if low is None or exact is None:
        return {"skipped": "the pairwise scores did not complete at both ranks"}
    agreement = score_agreement(low, exact)
    rank = int(run.score_args.query_gradient_low_rank)
    attach(run.stages["pairwise_scores"], "low_rank", check_low_rank_cost("pairwise_scores", rank, agreement))
    return {"rank": rank, "pairwise": agreement}


CONTRACT_CHECKS = frozenset({"task.loss_reduction", "task.batch_independence"})


def _contract_broken(run: Run) -> bool:
    return any(f.check in CONTRACT_CHECKS and f.severity == "fail" for f in run.stages["train"].findings)


def measure_batch_sensitivity(run: Run, labs: Labs) -> dict[str, Any]:
    """The effect of a Task that is not a sum over examples, measured: the rankings at the configured
    train batch size against three quarters of it (a correct Task ranks alike at any batch size). The
    number joins the contract's findings."""
    lab = labs.probe
    batch = run.train_batch_size
    other = max(1, (3 * batch) // 4)
    if other == batch:
        return {"skipped": "a batch of one has no smaller size to compare with"}
    kind = "pairwise" if "pairwise" in run.pipeline.scores else "self"
    base = lab.configured()
    smaller = lab.trial(run.factor_args, run.score_args, label=f"train batch size {other}", batch_size=other)
    before, after = base.scores(kind), smaller.scores(kind)
    if before is None or after is None:
        return {"skipped": "the scores did not complete at both batch sizes"}
    agreement = score_agreement(after, before)
    effect = (
        f"; measured on {lab.examples} examples: {kind} rankings at train batch sizes {batch} and {other} agree at "
        f"a median per-query Spearman of {agreement['median_spearman']:.4f}"
    )
    record = run.stages["train"]
    record.findings = [
        dataclasses.replace(f, message=f.message.rstrip(".") + effect + ".")
        if f.check in CONTRACT_CHECKS and "measured on" not in f.message
        else f
        for f in record.findings
    ]
    return {"batch_sizes": [batch, other], kind: agreement}


def _configured_storage(run: Run) -> dict[str, dict[str, str]]:
    def name(dtype: Any) -> str:
        return str(dtype).replace("torch.", "")

    fa = run.factor_args
    return {
        "covariance": {f: name(getattr(fa, f"{f}_dtype")) for f in ("activation_covariance", "gradient_covariance")},
        "lambda": {"lambda_matrix": name(fa.lambda_dtype)},
    }


def _stored(run: Run, stage: str) -> dict[str, str]:
    stored = run.stages[stage].metrics.get("stored", {})
    return {
        factor: next(iter(per_module.values()))["dtype"]
        for factor, per_module in stored.items()
        if per_module and isinstance(next(iter(per_module.values())), dict)
    }


def attach(record: StageRecord, subject: str, outcome: CheckOutcome) -> None:
    record.findings.extend(outcome.findings)
    if outcome.metrics:
        record.metrics.setdefault("probes", {}).setdefault(subject, {}).update(outcome.metrics)
