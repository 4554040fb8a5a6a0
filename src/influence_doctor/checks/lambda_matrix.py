"""Checks on EK-FAC's Lambda matrices: the corrected eigenvalues, stored as sums over examples."""

from __future__ import annotations

import torch

from influence_doctor.causes import FP16_OVERFLOW, NOT_PSD
from influence_doctor.checks.conditioning import check_damped_spectrum
from influence_doctor.checks.covariance import overflow_prone
from influence_doctor.checks.measures import as_float64, nonfinite_count, spectrum_extremes
from influence_doctor.checks.outcome import CheckOutcome, dtype_name, fmt
from influence_doctor.checks.spectra import effective_damping
from influence_doctor.checks.thresholds import Thresholds, eps
from influence_doctor.findings import fail

STAGE = "lambda"


def check_lambda(
    lambda_sum: torch.Tensor,
    count: float,
    subject: str,
    thresholds: Thresholds,
    *,
    damping_factor: float | None = 1e-8,
    precondition_dtype: torch.dtype = torch.float32,
    low_precision_inputs: bool = False,
) -> CheckOutcome:
    """Finite, non-negative, share dominated by damping, and cond(Λ+δ).

    `low_precision_inputs` says the per-sample gradients or AMP ran in an overflow-prone dtype, which
    makes overflow the likely reason for inf here.
    """
    outcome = CheckOutcome(metrics={"dtype": dtype_name(lambda_sum.dtype), "examples": float(count)})
    bad = nonfinite_count(lambda_sum)
    if bad:
        overflow = low_precision_inputs or overflow_prone(lambda_sum.dtype)
        outcome.findings.append(
            fail(
                "lambda.finite",
                f"{bad} of {lambda_sum.numel()} Lambda entries are inf/NaN.",
                subject=subject,
                value=float(bad),
                limit=0.0,
                cause=FP16_OVERFLOW if overflow else None,
            )
        )
        return outcome
    if lambda_sum.numel() == 0 or count <= 0:
        return outcome
    values = as_float64(lambda_sum) / float(count)
    smallest, largest, mean = spectrum_extremes(values)
    negative_limit = -thresholds.eigendecomposition.negative_eigenvalue_eps * eps(lambda_sum.dtype) * max(largest, 0.0)
    if smallest < negative_limit:
        outcome.findings.append(
            fail(
                "lambda.nonnegative",
                f"A Lambda entry is {fmt(smallest)}: corrected eigenvalues are sums of squares.",
                subject=subject,
                value=smallest,
                limit=negative_limit,
                cause=NOT_PSD,
            )
        )
    delta = effective_damping(damping_factor, mean)
    outcome.metrics["damping_dominated_share"] = float((values < delta).double().mean().item())
    return outcome.extend(
        check_damped_spectrum(smallest, largest, mean, damping_factor, precondition_dtype, subject, STAGE, thresholds)
    )
