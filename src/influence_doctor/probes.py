"""The measurements every diagnosis starts from, taken on the probe subsample; the checks judge them.

- precision: the configured settings against float64 end to end at the same damping — per-query
  rankings of the score kinds the pipeline asks for (median and worst Spearman, top-10 overlap,
  relative error), each factor against its float64 counterpart, and the dtypes results were stored in;
- headroom: each accumulated quantity's largest magnitude on the probe and on the rehearsal, carried to
  the full size at its measured growth; a covariance sum projected past its dtype's max is measured over
  all the data when one covariance pass fits the budget;
- damping sensitivity: the rankings again with every module's own damping ×10 (damping is the user's
  modeling choice: the doctor only says how much it matters);
- low-rank query gradients against full rank, and a Task that is not a sum at two train batch sizes;
- the hooks against autograd (`audit/hooks.py`), for the run's current configuration.

Probes only measure: `examine.py` turns what they measured into findings with the pure checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from influence_doctor.audit.hooks import HooksAudit, audited
from influence_doctor.changes import Target
from influence_doctor.checks.headroom import Headroom, accumulated_maxima, project_headroom
from influence_doctor.checks.precision import (
    check_reference_finite,
    check_score_agreement,
    disagrees,
    score_agreement,
)
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.checks.verdicts import CONTRACT_CHECKS
from influence_doctor.dtypes import score_path_dtype
from influence_doctor.labs import Lab, Labs
from influence_doctor.pipeline import SCORE_STAGE_OF


@dataclass(frozen=True)
class FactorComparison:
    """One factor as configured and in float64, on the probe."""

    stage: str
    subject: str
    configured: torch.Tensor
    reference: torch.Tensor
    dtype: torch.dtype


@dataclass
class Probes:
    """What the probes measured, for the checks (`examine.py`) and, summarised, for the report."""

    summary: dict[str, Any] = field(default_factory=dict)  # report.json's fidelity.probes
    factor_comparisons: list[FactorComparison] = field(default_factory=list)
    score_agreements: dict[str, dict[str, float]] = field(default_factory=dict)  # kind → vs float64, on the probe
    whole_rehearsal: dict[str, dict[str, float]] = field(default_factory=dict)  # kind → the same, where it disagreed
    precision_dtype: torch.dtype = torch.float64  # the coarsest dtype on the way to the scores
    storage: dict[str, tuple[dict[str, str], dict[str, str]]] = field(default_factory=dict)  # configured, stored
    headroom: list[Headroom] = field(default_factory=list)
    full_size: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # subject → measured overflow
    full_size_unmeasured: str = ""  # why a projected overflow was not measured
    damping: dict[str, dict[str, float]] = field(default_factory=dict)  # kind → rankings with damping ×10
    low_rank: tuple[int, dict[str, float]] | None = None  # (rank, rankings against full rank)
    refutes_bounds: float | None = None  # float64 agrees: its worst median Spearman, which refutes the bounds
    batch_effect: str | None = None  # a Task that is not a sum: its measured effect on the rankings
    hooks: HooksAudit | None = None  # the hooks against autograd (report.json's fidelity.hooks)
    frozen_effect: str | None = None  # tracking only the trained modules: its measured effect on the rankings
    score_stage: str = "pairwise_scores"  # where the audits' findings go: the first score stage the run computes


def measure_probes(run: Any, labs: Labs, thresholds: Thresholds | None = None, damping: bool = True) -> Probes:
    """Take the probes (the damping one only when asked) for the run's current configuration."""
    thresholds = thresholds or Thresholds()
    probes = Probes()
    summary = probes.summary
    if not run.session.ready:
        return probes
    if labs.probe is None or not labs.probe.examples:  # no float64 trial, but sums still grow with the data
        summary["headroom"] = measure_headroom(run, labs, thresholds, probes)
        return probes
    summary["precision"] = _timed(lambda: measure_precision(run, labs, thresholds, probes), labs)
    summary["headroom"] = _timed(lambda: measure_headroom(run, labs, thresholds, probes), labs)
    if damping:
        summary["damping"] = _timed(lambda: measure_damping_sensitivity(run, labs, probes), labs)
    if getattr(run.score_args, "query_gradient_low_rank", None) and "pairwise" in run.pipeline.scores:
        summary["low_rank"] = _timed(lambda: measure_low_rank_cost(run, labs, probes), labs)
    if _contract_broken(run):
        summary["batch_size"] = _timed(lambda: measure_batch_sensitivity(run, labs, probes), labs)
    evidence = run.session.evidence
    if evidence.frozen_tracked and evidence.trained_tracked and run.configuration == run.asked:
        summary["frozen"] = _timed(lambda: measure_frozen_effect(run, labs, probes), labs)
    probes.score_stage = "pairwise_scores" if "pairwise" in run.session.kinds else "self_scores"
    probes.hooks = audited(run, run.configuration, labs.probe)
    summary.update(examples=labs.probe.examples, queries=labs.probe.queries)
    return probes


def _timed(measure: Any, labs: Labs) -> dict[str, Any]:
    spent = labs.seconds
    try:
        result = measure()
    except Exception as exc:  # a probe is a measurement; its failure is reported, never fatal
        text = str(exc).strip()
        result = {"error": f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"}
    result["seconds"] = labs.seconds - spent
    return result


def measure_precision(run: Any, labs: Labs, thresholds: Thresholds, probes: Probes) -> dict[str, Any]:
    """Configured vs float64 on the probe: what the configured precision costs, in the user's terms."""
    lab = labs.probe
    configured = lab.configured()
    reference = lab.reference_for(configured)
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
                expected = reference.artifacts[stage][factor][module]
                probes.factor_comparisons.append(FactorComparison(stage, f"{module}/{factor}", tensor, expected, dtype))
    agree = True
    dtype = probes.precision_dtype = score_path_dtype(run.factor_args, run.score_args)
    for kind in run.pipeline.scores:
        stage = SCORE_STAGE_OF[kind]
        mine, expected = configured.scores(kind), reference.scores(kind)
        if mine is None or expected is None:
            agree = False
            continue
        agreement = result[kind] = probes.score_agreements[kind] = score_agreement(mine, expected)
        whole = _whole_rehearsal_agreement(labs, kind) if disagrees(agreement, dtype, thresholds) else None
        if whole is not None:
            result[f"{kind}_rehearsal"] = probes.whole_rehearsal[kind] = whole
        verdicts = check_score_agreement(stage, kind, agreement, dtype, thresholds, whole)
        verdicts.extend(check_reference_finite(stage, kind, agreement, whole))
        agree = agree and not any(f.severity == "fail" for f in verdicts.findings) and not agreement["nonfinite"]
    probes.storage = {
        stage: (configured_dtypes, _stored(run, stage)) for stage, configured_dtypes in _configured_storage(run).items()
    }
    if agree and not configured.errors:
        spearman = [a["median_spearman"] for a in probes.score_agreements.values()]
        finite = [value for value in spearman if not math.isnan(value)]
        probes.refutes_bounds = min(finite) if finite else math.nan
    result["agrees"] = agree
    return result


def measure_headroom(run: Any, labs: Labs, thresholds: Thresholds, probes: Probes) -> dict[str, Any]:
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
    artifacts = run.artifacts
    for stage, factor in scale.items():
        small = accumulated_maxima(probe.artifacts, stage) if probe is not None else {}
        for subject, (size, largest, _dtype_max) in accumulated_maxima(artifacts, stage).items():
            size_probe, max_probe = small.get(subject, (0.0, 0.0, 0.0))[:2]
            dtype = _stored_dtype(artifacts, stage, subject)
            headroom = project_headroom(subject, stage, dtype, (size_probe, max_probe), (size, largest), size * factor)
            run.headroom[subject] = headroom
            probes.headroom.append(headroom)
    probes.full_size, probes.full_size_unmeasured = _measure_projected_overflow(run, probes.headroom, thresholds)
    summary: dict[str, Any] = {"quantities": len(probes.headroom)}
    if counts := run.executor.full_size_counts:
        spent = sum(count.seconds for count in counts)
        summary["measured_at_full_size"] = {"examples": total, "subjects": sorted(probes.full_size), "seconds": spent}
    return summary


def affordable(run: Any, share: float, floor_seconds: float) -> tuple[bool, float, float]:
    """(whether one covariance pass over all the data fits the budget, its projected seconds, the budget):
    the covariance stage's rehearsal seconds scaled to the full size, against `share` of the whole
    rehearsal's stages scaled alike (at least `floor_seconds`)."""
    rehearsed, total = max(len(run.train_indices), 1), run.train_examples_total
    scale = total / rehearsed
    seconds = {name: result.seconds or 0.0 for name, result in run.stage_results().items() if name != "train"}
    covariance = seconds.get("covariance", 0.0) * scale
    stages = sum(seconds.values()) * scale
    budget = max(floor_seconds, share * stages)
    return covariance <= budget, covariance, budget


def _measure_projected_overflow(
    run: Any, projected: list[Headroom], thresholds: Thresholds
) -> tuple[dict[str, tuple[int, int, int, int]], str]:
    """Covariance sums projected past their dtype's max, measured over all the data when one covariance
    pass fits the budget: subject → (non-finite entries, entries, examples accumulated, all examples);
    else why it was not."""
    overflowing = [h for h in projected if h.stage == "covariance" and h.share_projected > 1.0]
    if not overflowing:
        return {}, ""
    share, floor = thresholds.covariance.overflow_measure_share, thresholds.covariance.overflow_measure_min_seconds
    fits, seconds, budget = affordable(run, share, floor)
    if not fits:
        return {}, f"one covariance pass over all the data would take ~{seconds:.3g} s, over its {budget:.3g} s budget"
    count = run.executor.full_size_covariance(run.configuration)
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
    mine, expected = configured.scores(kind), lab.reference_for(configured).scores(kind)
    return None if mine is None or expected is None else score_agreement(mine, expected)


def measure_damping_sensitivity(run: Any, labs: Labs, probes: Probes) -> dict[str, Any]:
    """Rankings with every module's own damping ×10 against the configured ones, as `info`."""
    lab = labs.probe
    base = lab.configured()
    if base.errors:
        return {"skipped": "the configured settings did not complete on the probe"}
    # The rankings a user reads: pairwise when computed (self otherwise); one kind keeps the probe cheap
    # when every module needs its own scoring pass (the heuristic damping differs per module).
    kinds = ("pairwise",) if "pairwise" in run.pipeline.scores else ("self",)
    raised, why = lab.counterfactual(base, "damping:x10-exact", Target("pairwise_scores", "damping"), kinds)
    if raised is None:
        return {"skipped": why}
    result: dict[str, Any] = {"damping": raised.damping}
    for kind in kinds:
        before, after = base.scores(kind), raised.scores(kind)
        if before is None or after is None:
            continue
        result[kind] = probes.damping[kind] = score_agreement(after, before)
    return result


def measure_low_rank_cost(run: Any, labs: Labs, probes: Probes) -> dict[str, Any]:
    """Pairwise rankings with the configured low-rank query gradients against full rank, as `info`."""
    lab = labs.probe
    base = lab.configured()
    if base.errors:
        return {"skipped": "the configured settings did not complete on the probe"}
    full, why = lab.counterfactual(base, "low-rank:off", Target("pairwise_scores"), ("pairwise",))
    if full is None:
        return {"skipped": why}
    low, exact = base.scores("pairwise"), full.scores("pairwise")
    if low is None or exact is None:
        return {"skipped": "the pairwise scores did not complete at both ranks"}
    agreement = score_agreement(low, exact)
    rank = int(run.score_args.query_gradient_low_rank)
    probes.low_rank = (rank, agreement)
    return {"rank": rank, "pairwise": agreement}


def _contract_broken(run: Any) -> bool:
    return any(f.check in CONTRACT_CHECKS and f.severity == "fail" for f in run.stages["train"].findings)


def measure_batch_sensitivity(run: Any, labs: Labs, probes: Probes) -> dict[str, Any]:
    """The effect of a Task that is not a sum over examples, measured: the rankings at the configured
    train batch size against three quarters of it (a correct Task ranks alike at any batch size)."""
    effect = _ranking_effect(run, labs, "batch:three-quarters", "at both batch sizes")
    if isinstance(effect, str):
        return {"skipped": effect or "a batch of one has no smaller size to compare with"}
    lab, kind, changed, agreement = effect
    batch, other = run.train_batch_size, changed.configuration.batch_size
    probes.batch_effect = (
        f"measured on {lab.examples} examples: {kind} rankings at train batch sizes {batch} and {other} agree at "
        f"a median per-query Spearman of {agreement['median_spearman']:.4f}"
    )
    return {"batch_sizes": [batch, other], kind: agreement}


def measure_frozen_effect(run: Any, labs: Labs, probes: Probes) -> dict[str, Any]:
    """The rankings with only the modules the training changed tracked, against all of them (same seed)."""
    trained = ",".join(run.session.evidence.trained_tracked)
    effect = _ranking_effect(run, labs, f"track:{trained}", "with both sets of modules")
    if isinstance(effect, str):
        return {"skipped": effect}
    lab, kind, _changed, agreement = effect
    probes.frozen_effect = (
        f"Measured on {lab.examples} examples at the same sampling seed: {kind} rankings with only the trained "
        f"modules tracked agree with all of them at a median per-query Spearman of {agreement['median_spearman']:.3f} "
        f"(top-10 overlap {agreement['top_overlap']:.2f})"
    )
    return {"modules": len(run.session.evidence.trained_tracked), kind: agreement}


def _ranking_effect(run: Any, labs: Labs, change: str, both: str) -> tuple[Lab, str, Any, dict[str, float]] | str:
    """The probe's rankings with `change` against the configured ones (same seed), or why not measured."""
    lab: Lab = labs.probe
    base = lab.configured()
    kind = "pairwise" if "pairwise" in run.pipeline.scores else "self"
    changed, why = lab.counterfactual(base, change, Target("covariance"))
    if changed is None:
        return why or ""
    before, after = base.scores(kind), changed.scores(kind)
    if before is None or after is None:
        return f"the scores did not complete {both}"
    return lab, kind, changed, score_agreement(after, before)


def _configured_storage(run: Any) -> dict[str, dict[str, str]]:
    def name(dtype: Any) -> str:
        return str(dtype).replace("torch.", "")

    fa = run.factor_args
    return {
        "covariance": {f: name(getattr(fa, f"{f}_dtype")) for f in ("activation_covariance", "gradient_covariance")},
        "lambda": {"lambda_matrix": name(fa.lambda_dtype)},
    }


def _stored(run: Any, stage: str) -> dict[str, str]:
    result = run.stage_results().get(stage)
    stored = result.stored() if result is not None and result.completed else {}
    return {
        factor: next(iter(per_module.values()))["dtype"]
        for factor, per_module in stored.items()
        if per_module and isinstance(next(iter(per_module.values())), dict)
    }
