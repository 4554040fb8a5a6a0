"""How much a fix moved the scores, measured the way a user reads them: per-query rankings of the healed
configuration against a reference that always exists.

The reference is the least-regularized earlier configuration whose scores were finite and trustworthy
(the closest thing to what the user asked for that the run itself computed) or, when there is none,
float64 end to end of the configuration as given — same strategy, damping and task — on the probe.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from scipy import stats

from influence_doctor.checks.precision import score_agreement
from influence_doctor.pipeline import STAGES

FLOAT64_REFERENCE = "float64 as configured"
"""The reference that always exists: the user's configuration (strategy, damping, task) in float64 end to end."""

HEADLINE_KEYS = ("median_spearman", "worst_spearman", "top_overlap")


@dataclass
class Snapshot:
    """Scores of one configuration, for the fidelity comparison."""

    label: str
    scores: dict[str, Any]
    trusted: bool  # every score finite, and no measurement showed them or the factors behind them wrong
    regularization: dict[str, Any]
    spectra: dict[str, Any] = field(default_factory=dict)  # module → checks.spectra.Spectrum, for the plots


def snapshot(run: Any, label: str) -> Snapshot:
    """The run's scores as they stand, whether they can be trusted, and the regularization behind them."""
    import torch

    from influence_doctor.checks.scores import total_scores
    from influence_doctor.checks.spectra import spectra_of

    scores = {
        kind: total_scores(run.artifacts[stage]).detach().clone()
        for kind, stage in (("pairwise", "pairwise_scores"), ("self", "self_scores"))
        if run.artifacts.get(stage) and run.stages[stage].completed
    }
    finite = bool(scores) and all(bool(torch.isfinite(tensor).all()) for tensor in scores.values())
    # trustworthy: no measured wrong number in the scores or anything they were computed from (finite
    # scores from an overflowed covariance are garbage, however well they rank against float64 on a probe)
    measured_wrong = any(f.severity == "fail" for name in STAGES[1:] for f in run.stages[name].findings)
    regularization = {
        "damping_factor": run.score_args.damping_factor,
        "covariance_shift": run.covariance_shift,
        "strategy": run.factor_args.strategy,
    }
    sa = run.score_args
    spectra = spectra_of(run.artifacts, run.factor_args.strategy, sa.damping_factor, sa.precondition_dtype)
    return Snapshot(label, scores, finite and not measured_wrong, regularization, spectra)


def pearson(first: torch.Tensor, second: torch.Tensor) -> float:
    a, b = first.double().flatten().cpu(), second.double().flatten().cpu()
    if a.shape != b.shape:
        return math.nan
    keep = torch.isfinite(a) & torch.isfinite(b)
    if int(keep.sum()) < 3 or float(a[keep].std()) == 0.0 or float(b[keep].std()) == 0.0:
        return math.nan
    return float(stats.pearsonr(a[keep].numpy(), b[keep].numpy()).statistic)


def compare_scores(final: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Per score kind present in both: per-query Spearman (median and worst), top-10 overlap, Pearson."""
    out: dict[str, Any] = {}
    for kind in final:
        if kind not in reference or final[kind] is None or reference[kind] is None:
            continue
        agreement = score_agreement(final[kind], reference[kind])
        out[kind] = {key: agreement[key] for key in (*HEADLINE_KEYS, "relative_error", "reference_nonfinite")}
        out[kind]["pearson"] = pearson(final[kind], reference[kind])
    return out


def headline(agreement: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The kind whose median per-query Spearman is lowest speaks for the fix: a fix must not distort
    any score the user asked for. NaN (rankings undefined, e.g. constant scores) is not a low value."""
    measured = [(kind, values) for kind, values in agreement.items() if not math.isnan(values["median_spearman"])]
    if not measured:
        return {key: math.nan for key in HEADLINE_KEYS} | {"kind": None}
    kind, values = min(measured, key=lambda item: item[1]["median_spearman"])
    return {key: values[key] for key in HEADLINE_KEYS} | {"kind": kind}


def rankings_against(candidate: Any, reference: Any, kinds: tuple[str, ...], label: str) -> dict[str, Any]:
    """A candidate configuration's trial against the reference trial (called `label`) on the same subsample."""
    agreement = compare_scores({k: candidate.scores(k) for k in kinds}, {k: reference.scores(k) for k in kinds})
    return {
        "reference": label,
        **headline(agreement),
        "examples": candidate.examples,
        "queries": candidate.queries,
        "agreement": agreement,
    }


def below(fidelity: Mapping[str, Any], limit: float) -> bool:
    """Whether a fix fails the bar: its median per-query Spearman below `limit`, or not measured at all (NaN
    or missing is never a pass), unless its reference itself defines no influence (`undefined_reference`:
    there is no distortion to measure, said in the report)."""
    if fidelity.get("undefined_reference") or undefined_reference(fidelity):
        return False
    value = fidelity.get("median_spearman", math.nan)
    return value is None or math.isnan(value) or value < limit


def undefined_reference(fidelity: Mapping[str, Any]) -> bool:
    """No Spearman because the reference has no finite influence to rank against (inf/NaN at the damping
    as given): there is no distortion to measure, which is not a failed measurement."""
    value = fidelity.get("median_spearman", math.nan)
    unmeasured = value is None or math.isnan(value)
    agreement = fidelity.get("agreement") or {}
    return unmeasured and any((values or {}).get("reference_nonfinite", 0.0) > 0 for values in agreement.values())


def fix_fidelity(
    snapshots: list[Any],
    limit: float,
    float64: tuple[Any, Any] | None = None,
    kinds: tuple[str, ...] = ("pairwise", "self"),
) -> dict[str, Any]:
    """The final configuration against its reference, with the numbers the `min_fix_spearman` gate reads.

    The reference is float64 of the configuration as the user gave it (`float64`: the pair (final
    configuration, that reference) on the probe): what the user asked for. Only where it cannot be
    computed (no probe), the earliest trusted of `snapshots` (the run's scores before any remedy and after
    each one; rungs climb from least to most distorting, so the earliest is the least regularized), and
    the report says which.
    """
    if len(snapshots) < 2:
        return {"reference": None, "reason": "no remedy was applied"}
    final = snapshots[-1]
    if not final.trusted:
        return {"reference": None, "reason": "the final configuration's scores are not finite or not trustworthy"}
    earlier = [s for s in snapshots[:-1] if s.trusted]
    if float64 is not None:
        candidate, reference = float64
        result = rankings_against(candidate, reference, kinds, FLOAT64_REFERENCE) | {"reference_kind": "float64"}
        result["reference_regularization"] = snapshots[0].regularization
    elif earlier:
        reference = earlier[0]
        agreement = compare_scores(final.scores, reference.scores)
        shape = next(iter(final.scores.values())).shape if final.scores else ()
        result = {
            "reference": reference.label,
            "reference_kind": "least-regularized finite run",
            **headline(agreement),
            "examples": int(shape[-1]) if shape else 0,
            "queries": int(shape[0]) if len(shape) == 2 else 0,
            "agreement": agreement,
            "reference_regularization": reference.regularization,
            "reason": "float64 of the configuration as given could not be computed (no probe)",
        }
    else:
        return {"reference": None, "reason": "no float64 reference could be computed (no Analyzer or no data)"}
    if undefined_reference(result):
        result["undefined_reference"] = True
        result["reason"] = (
            f"{result['reference']} has no finite influence to rank against (inf/NaN at the damping as given): "
            "the fix defines what the configuration leaves undefined, so there is no distortion to measure"
        )
    result["final_regularization"] = final.regularization
    result["method_changed"] = final.regularization.get("strategy") != snapshots[0].regularization.get("strategy")
    result["limit"] = limit
    result["below_limit"] = below(result, limit)
    return result
