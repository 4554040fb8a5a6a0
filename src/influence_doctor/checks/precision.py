"""Checks that compare the configured precision with a float64 counterfactual on the same data.

They measure what the user computes: each query's ranking of the training examples (pairwise scores)
or the ranking of self-influences, against the same computation in float64 with the same damping.
A disagreement is a measured wrong result, so it is a `fail`; the tolerances come from the dtype.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

import torch
from scipy import stats

from influence_doctor.causes import DTYPE_DRIFT, LOW_PRECISION_LOSS, TINY_DAMPING
from influence_doctor.checks.measures import as_float64, relative_frobenius
from influence_doctor.checks.outcome import CheckOutcome, dtype_name, fmt
from influence_doctor.checks.thresholds import Thresholds, eps
from influence_doctor.findings import finding, warn

TOP_K = 10
"""Training examples per query whose overlap with float64's top ones is reported."""


def rank_agreement(first: torch.Tensor, second: torch.Tensor) -> float:
    """Spearman correlation of two score tensors over entries finite in both; NaN when undefined."""
    a, b = as_float64(first).flatten().cpu(), as_float64(second).flatten().cpu()
    if a.shape != b.shape:
        return math.nan
    keep = torch.isfinite(a) & torch.isfinite(b)
    if int(keep.sum()) < 3 or float(a[keep].std()) == 0.0 or float(b[keep].std()) == 0.0:
        return math.nan
    return float(stats.spearmanr(a[keep].numpy(), b[keep].numpy()).statistic)


def top_overlap(first: torch.Tensor, second: torch.Tensor, k: int = TOP_K) -> float:
    """Share of the k largest finite entries of `second` that are also among the k largest of `first`."""
    a, b = as_float64(first).flatten().cpu(), as_float64(second).flatten().cpu()
    if a.shape != b.shape or a.numel() == 0:
        return math.nan
    k = min(k, a.numel())
    low = torch.tensor(-math.inf, dtype=torch.float64)
    a = torch.where(torch.isfinite(a), a, low)
    b = torch.where(torch.isfinite(b), b, low)
    top_a = set(torch.topk(a, k).indices.tolist())
    top_b = set(torch.topk(b, k).indices.tolist())
    return len(top_a & top_b) / k


def relative_error(configured: torch.Tensor, reference: torch.Tensor) -> float:
    """‖configured − reference‖_F / ‖reference‖_F over entries finite in both."""
    a, b = as_float64(configured).cpu(), as_float64(reference).cpu()
    if a.shape != b.shape:
        return math.nan
    keep = torch.isfinite(a) & torch.isfinite(b)
    if not bool(keep.any()):
        return math.nan
    return relative_frobenius((a - b)[keep], b[keep])


def _finite_rows_agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[list[float], list[float]]:
    """`rank_agreement` and `top_overlap` of every row of two finite float64 matrices at once: Spearman is
    Pearson's correlation of the average ranks (ties shared), NaN for a constant row."""
    ranks_a = torch.from_numpy(stats.rankdata(a.numpy(), axis=1))
    ranks_b = torch.from_numpy(stats.rankdata(b.numpy(), axis=1))
    ranks_a = ranks_a - ranks_a.mean(dim=1, keepdim=True)
    ranks_b = ranks_b - ranks_b.mean(dim=1, keepdim=True)
    norms = ranks_a.norm(dim=1) * ranks_b.norm(dim=1)
    constant = (a.std(dim=1) == 0) | (b.std(dim=1) == 0)
    rho = ((ranks_a * ranks_b).sum(dim=1) / norms).clamp(-1.0, 1.0)
    spearman = [math.nan if flat else float(value) for value, flat in zip(rho, constant, strict=True)]
    k = min(TOP_K, a.shape[1])
    top_a, top_b = torch.topk(a, k, dim=1).indices.tolist(), torch.topk(b, k, dim=1).indices.tolist()
    overlaps = [len(set(x) & set(y)) / k for x, y in zip(top_a, top_b, strict=True)]
    return spearman, overlaps


def score_agreement(configured: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """How well one set of scores reproduces another, the way a user reads them.

    Pairwise scores [queries × train]: per-query Spearman (median and worst over queries) and the
    median top-10 overlap; self scores [train]: one Spearman and one overlap. Relative error and the
    non-finite counts on both sides, always.
    """
    a, b = as_float64(configured).cpu(), as_float64(reference).cpu()
    rows_a, rows_b = (a, b) if a.ndim == 2 else (a.reshape(1, -1), b.reshape(1, -1))
    if rows_a.shape != rows_b.shape:
        return {"median_spearman": math.nan, "worst_spearman": math.nan, "top_overlap": math.nan}
    if bool(torch.isfinite(rows_a).all() and torch.isfinite(rows_b).all()) and rows_a.shape[1] >= 3:
        spearman, overlaps = _finite_rows_agreement(rows_a, rows_b)  # the same numbers, all rows at once
    else:
        spearman = [rank_agreement(x, y) for x, y in zip(rows_a, rows_b, strict=True)]
        overlaps = [top_overlap(x, y) for x, y in zip(rows_a, rows_b, strict=True)]
    finite = [v for v in spearman if not math.isnan(v)]
    return {
        "median_spearman": statistics.median(finite) if finite else math.nan,
        "worst_spearman": min(finite) if finite else math.nan,
        "top_overlap": statistics.median([v for v in overlaps if not math.isnan(v)] or [math.nan]),
        "relative_error": relative_error(a, b),
        "nonfinite": float((~torch.isfinite(a)).sum()),
        "reference_nonfinite": float((~torch.isfinite(b)).sum()),
        "only_reference_nonfinite": float((torch.isfinite(a) & ~torch.isfinite(b)).sum()),
        "only_configured_nonfinite": float((~torch.isfinite(a) & torch.isfinite(b)).sum()),
        "rows": float(rows_a.shape[0]),
    }


def agreement_verdict(agreement: Mapping[str, float], dtype: torch.dtype, thresholds: Thresholds) -> tuple[bool, str]:
    """Whether the configured scores disagree with float64 in what the user reads, and why.

    Wrong means scores lost to inf/NaN that float64 computes, or rankings reordered: the median
    per-query Spearman below `precision_min_spearman`, by errors larger than a few roundings of `dtype`
    (below that, the reordering is near-ties broken by rounding, not an error). A relative error alone
    is not judged: scores off by 0.1% in fp32 rank the same examples on top.
    """
    error = agreement.get("relative_error", math.nan)
    spearman = agreement.get("median_spearman", math.nan)
    tie_limit = thresholds.precision.precision_tie_eps * eps(dtype)
    lost = agreement.get("only_configured_nonfinite", 0.0)
    if lost:
        return True, f"{lost:.0f} scores are inf/NaN as configured but finite in float64"
    if not math.isnan(spearman) and spearman < thresholds.precision.precision_min_spearman and not error <= tie_limit:
        return True, (
            f"median per-query Spearman {spearman:.3f} is below {thresholds.precision.precision_min_spearman:g} "
            f"(relative error {fmt(error)}, beyond {dtype_name(dtype)} rounding)"
        )
    return False, ""


def check_score_agreement(
    stage: str,
    subject: str,
    agreement: Mapping[str, float],
    dtype: torch.dtype,
    thresholds: Thresholds,
    whole: Mapping[str, float] | None = None,
) -> CheckOutcome:
    """`scores.precision`: the configured scores must reproduce the float64 counterfactual.

    `agreement` is measured on the probe subsample; `whole`, when given, is the same comparison on the
    whole rehearsal, taken because the probe disagreed. Both compare identical sampled targets (the draws
    are per example, `runner/sampling.py`), so what differs is precision alone; fewer examples leave more
    directions without curvature, where rounding decides, so a disagreement only the probe shows is the
    probe's size, not the configured precision at the size the run has: an `info`, saying so.
    """
    outcome = CheckOutcome(metrics={"vs_float64": dict(agreement), "precision_dtype": dtype_name(dtype)})
    wrong, reason = agreement_verdict(agreement, dtype, thresholds)
    if not wrong:
        return outcome
    severity, measured = "fail", agreement
    if whole is not None:
        outcome.metrics["vs_float64_rehearsal"] = dict(whole)
        whole_wrong, whole_reason = agreement_verdict(whole, dtype, thresholds)
        if whole_wrong:
            reason, measured = f"{whole_reason} on the whole rehearsal", whole
        else:
            severity = "info"
            reason += (
                f" on the probe subsample only; the whole rehearsal agrees (median per-query Spearman "
                f"{whole.get('median_spearman', math.nan):.4f}): the probe's size, whose factors leave directions "
                "without curvature that rounding decides, not the configured precision"
            )
    outcome.findings.append(
        finding(
            severity,
            "scores.precision",
            f"The {subject} scores as configured disagree with the same computation in float64: "
            f"{reason} (worst query {measured.get('worst_spearman', math.nan):.3f}, top-{TOP_K} overlap "
            f"{measured.get('top_overlap', math.nan):.2f}).",
            subject=subject,
            value=measured.get("median_spearman"),
            limit=thresholds.precision.precision_min_spearman,
            cause=LOW_PRECISION_LOSS,
            stage=stage,
        )
    )
    return outcome


def disagrees(agreement: Mapping[str, float], dtype: torch.dtype, thresholds: Thresholds) -> bool:
    """Whether either probe check would find something wrong in `agreement` (worth confirming at scale)."""
    return agreement_verdict(agreement, dtype, thresholds)[0] or agreement.get("reference_nonfinite", 0.0) > 0


def check_reference_finite(
    stage: str, subject: str, agreement: Mapping[str, float], whole: Mapping[str, float] | None = None
) -> CheckOutcome:
    """`scores.reference_finite`: scores that are inf/NaN in float64 at the same damping are undefined at
    that damping (singular curvature the damping does not cover, or inf/NaN from the model or data):
    finite configured values there are rounding noise divided by almost nothing. The diagnosis tells
    the two apart by raising the damping. As for `check_score_agreement`, what only the probe shows
    (`whole` finite) is the probe's size: an `info`."""
    bad = agreement.get("reference_nonfinite", 0.0)
    outcome = CheckOutcome()
    if bad <= 0:
        return outcome
    severity, where = "fail", ""
    if whole is not None:
        whole_bad = whole.get("reference_nonfinite", 0.0)
        if whole_bad > 0:
            bad, where = whole_bad, " on the whole rehearsal"
        else:
            severity, where = "info", " on the probe subsample only (the whole rehearsal is finite: the probe's size)"
    outcome.findings.append(
        finding(
            severity,
            "scores.reference_finite",
            f"{bad:.0f} {subject} scores are inf/NaN in float64 at the same damping{where}: the influence "
            "is undefined there, so any finite value computed for them is rounding noise.",
            subject=subject,
            value=bad,
            limit=0.0,
            cause=TINY_DAMPING,
            stage=stage,
        )
    )
    return outcome


def check_factor_precision(
    configured: torch.Tensor,
    reference: torch.Tensor,
    subject: str,
    stage: str,
    configured_dtype: torch.dtype,
    thresholds: Thresholds,
) -> CheckOutcome:
    """Relative error of a factor as configured against the float64 counterfactual (a `warn`: a factor
    error matters only through the scores, which `check_score_agreement` judges)."""
    if configured.shape != reference.shape:
        return CheckOutcome()
    error = relative_frobenius(as_float64(configured) - as_float64(reference), reference)
    limit = thresholds.precision.precision_error_sqrt_eps * math.sqrt(eps(configured_dtype))
    outcome = CheckOutcome(metrics={"error_vs_float64": error})
    if error > limit:
        outcome.findings.append(
            warn(
                f"{stage}.precision",
                f"In {dtype_name(configured_dtype)} this factor is {fmt(error)} away from float64 "
                f"(relative): more than half of the dtype's digits ({fmt(limit)}).",
                subject=subject,
                value=error,
                limit=limit,
                cause=LOW_PRECISION_LOSS,
                stage=stage,
            )
        )
    return outcome


def check_stored_dtypes(
    stage: str, configured: Mapping[str, str | None], stored: Mapping[str, str | None]
) -> CheckOutcome:
    """Stored results in a coarser dtype than configured for their computation lose what was paid for."""
    outcome = CheckOutcome()
    for factor, stored_name in stored.items():
        wanted = configured.get(factor)
        if not wanted or not stored_name or wanted == stored_name:
            continue
        wanted_dtype, stored_dtype = getattr(torch, wanted, None), getattr(torch, stored_name, None)
        if not isinstance(wanted_dtype, torch.dtype) or not isinstance(stored_dtype, torch.dtype):
            continue
        if eps(stored_dtype) > eps(wanted_dtype):
            outcome.findings.append(
                warn(
                    f"{stage}.dtype_drift",
                    f"{factor} was configured for {wanted} but stored in {stored_name}.",
                    subject=factor,
                    value=eps(stored_dtype),
                    limit=eps(wanted_dtype),
                    cause=DTYPE_DRIFT,
                    stage=stage,
                )
            )
    return outcome
