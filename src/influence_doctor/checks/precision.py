"""Checks that compare the configured precision with a float64 reference on the same data."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from scipy import stats

from influence_doctor.checks.measures import as_float64, relative_frobenius
from influence_doctor.checks.outcome import CheckOutcome, dtype_name, fmt
from influence_doctor.checks.thresholds import Thresholds, eps
from influence_doctor.findings import Finding


def rank_agreement(first: torch.Tensor, second: torch.Tensor) -> float:
    """Spearman correlation of two score tensors over entries finite in both; NaN when undefined."""
    a, b = as_float64(first).flatten().cpu(), as_float64(second).flatten().cpu()
    if a.shape != b.shape:
        return math.nan
    keep = torch.isfinite(a) & torch.isfinite(b)
    if int(keep.sum()) < 3 or float(a[keep].std()) == 0.0 or float(b[keep].std()) == 0.0:
        return math.nan
    return float(stats.spearmanr(a[keep].numpy(), b[keep].numpy()).statistic)


def check_factor_precision(
    configured: torch.Tensor,
    reference: torch.Tensor,
    subject: str,
    stage: str,
    configured_dtype: torch.dtype,
    thresholds: Thresholds,
) -> CheckOutcome:
    """Relative error of a factor computed as configured against the float64 shadow computation."""
    if configured.shape != reference.shape:
        return CheckOutcome()
    error = relative_frobenius(as_float64(configured) - as_float64(reference), reference)
    limit = thresholds.precision_error_eps * eps(configured_dtype)
    outcome = CheckOutcome(metrics={"error_vs_float64": error})
    if error > limit:
        outcome.findings.append(
            Finding(
                check=f"{stage}.precision",
                stage=stage,
                subject=subject,
                severity="warn",
                value=error,
                limit=limit,
                cause="low-precision-loss",
                message=f"In {dtype_name(configured_dtype)} this factor is {fmt(error)} away from float64 "
                f"(relative), beyond honest rounding ({fmt(limit)}).",
            )
        )
    return outcome


def check_score_precision(
    configured: torch.Tensor, reference: torch.Tensor, stage: str, subject: str, thresholds: Thresholds
) -> CheckOutcome:
    """Score rankings as configured must match the float64 shadow run's rankings."""
    agreement = rank_agreement(configured, reference)
    outcome = CheckOutcome(metrics={"spearman_vs_float64": agreement})
    if not math.isnan(agreement) and agreement < thresholds.precision_min_spearman:
        outcome.findings.append(
            Finding(
                check="scores.precision",
                stage=stage,
                subject=subject,
                severity="fail",
                value=agreement,
                limit=thresholds.precision_min_spearman,
                cause="low-precision-loss",
                message=f"Rankings as configured agree with float64 only to Spearman {agreement:.3f}: "
                "the configured precision changes which examples look influential.",
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
                Finding(
                    check=f"{stage}.dtype_drift",
                    stage=stage,
                    subject=factor,
                    severity="warn",
                    value=eps(stored_dtype),
                    limit=eps(wanted_dtype),
                    cause="dtype-drift",
                    message=f"{factor} was configured for {wanted} but stored in {stored_name}.",
                )
            )
    return outcome
