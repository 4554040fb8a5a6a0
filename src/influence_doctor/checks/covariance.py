"""Checks on kronfluence's covariance factors: the unnormalised sums Σ xxᵀ and their example counts."""

from __future__ import annotations

import torch

from influence_doctor.causes import ASYMMETRIC, FP16_OVERFLOW, NONFINITE_MODEL, NOT_PSD, RANK_DEFICIENT
from influence_doctor.checks.measures import (
    as_float64,
    dead_rows,
    first_nonfinite_position,
    max_abs_finite,
    nonfinite_count,
    symmetry_error,
)
from influence_doctor.checks.outcome import CheckOutcome, dtype_name, fmt
from influence_doctor.checks.thresholds import Thresholds, eps, max_value
from influence_doctor.findings import fail, warn


def overflow_prone(dtype: torch.dtype) -> bool:
    """Dtypes with float16's narrow range (or narrower): sums finite in fp32 or bf16 overflow in them."""
    return dtype.is_floating_point and max_value(dtype) <= max_value(torch.float16)


def check_covariance_sum(
    covariance_sum: torch.Tensor,
    count: int | float,
    subject: str,
    thresholds: Thresholds,
    computed_in: torch.dtype | None = None,
) -> CheckOutcome:
    """Finite, headroom to the dtype's max, symmetry, non-negative diagonal and dead units of one factor.

    `computed_in` is the autocast (AMP) dtype the activations and gradients were computed in, if any:
    inf/NaN from an fp16 forward or backward pass is overflow even when the sum is stored in fp32.
    """
    outcome = CheckOutcome()
    dtype = covariance_sum.dtype
    bad = nonfinite_count(covariance_sum)
    peak = max_abs_finite(covariance_sum)
    headroom = peak / max_value(dtype) if dtype.is_floating_point else 0.0
    outcome.metrics.update(
        dtype=dtype_name(dtype),
        size=int(covariance_sum.shape[0]) if covariance_sum.ndim else 0,
        examples=float(count),
        nonfinite=bad,
        max_abs=peak,
        headroom_used=headroom,
    )
    if bad:
        position = first_nonfinite_position(covariance_sum)
        infs = int(torch.isinf(covariance_sum).sum().item())
        amp_overflow = computed_in is not None and overflow_prone(computed_in)
        overflow = (overflow_prone(dtype) and infs > 0) or amp_overflow
        outcome.findings.append(
            fail(
                "covariance.finite",
                f"{bad} of {covariance_sum.numel()} entries are inf/NaN (first at {position}); "
                + (
                    f"activations or gradients overflowed in {dtype_name(computed_in)} autocast."
                    if amp_overflow
                    else f"the {dtype_name(dtype)} sum passed its maximum {max_value(dtype):.0f}."
                    if overflow
                    else "the activations or gradients feeding it were already non-finite."
                ),
                subject=subject,
                value=float(bad),
                limit=0.0,
                cause=FP16_OVERFLOW if overflow else NONFINITE_MODEL,
            )
        )
    elif headroom > thresholds.covariance.headroom_warn_fraction:
        outcome.findings.append(
            warn(
                "covariance.headroom",
                f"The largest entry {fmt(peak)} uses {headroom:.0%} of {dtype_name(dtype)}'s range: "
                f"a little more data will overflow it.",
                subject=subject,
                value=headroom,
                limit=thresholds.covariance.headroom_warn_fraction,
                cause=FP16_OVERFLOW if overflow_prone(dtype) else None,
            )
        )
    if covariance_sum.ndim != 2 or covariance_sum.numel() == 0:
        return outcome
    finite = torch.where(torch.isfinite(covariance_sum), covariance_sum, torch.zeros_like(covariance_sum))
    asymmetry = symmetry_error(finite)
    limit = min(thresholds.covariance.symmetry_eps * eps(dtype), thresholds.covariance.symmetry_max)
    outcome.metrics["asymmetry"] = asymmetry
    if asymmetry > limit:
        outcome.findings.append(
            warn(
                "covariance.symmetry",
                f"‖C−Cᵀ‖/‖C‖ is {fmt(asymmetry)}, above {dtype_name(dtype)} rounding ({fmt(limit)}).",
                subject=subject,
                value=asymmetry,
                limit=limit,
                cause=ASYMMETRIC,
            )
        )
    diagonal = as_float64(torch.diagonal(finite))
    top = float(diagonal.abs().max().item())
    lowest = float(diagonal.min().item())
    negative_limit = -thresholds.covariance.negative_diagonal_eps * eps(dtype) * top
    outcome.metrics["min_diagonal"] = lowest
    if lowest < negative_limit:
        outcome.findings.append(
            fail(
                "covariance.diagonal",
                f"A diagonal entry is {fmt(lowest)}: a sum of squares cannot be negative.",
                subject=subject,
                value=lowest,
                limit=negative_limit,
                cause=NOT_PSD,
            )
        )
    dead = dead_rows(finite, thresholds.covariance.dead_unit_eps)
    size = covariance_sum.shape[0]
    outcome.metrics["dead_units"] = dead
    if size and dead / size > thresholds.covariance.dead_unit_warn_fraction:
        outcome.findings.append(
            warn(
                "covariance.dead_units",
                f"{dead} of {size} units never carried signal (zero rows): the factor is singular.",
                subject=subject,
                value=dead / size,
                limit=thresholds.covariance.dead_unit_warn_fraction,
                cause=RANK_DEFICIENT,
            )
        )
    return outcome


def check_examples_processed(activation_counts: dict[str, float], gradient_counts: dict[str, float]) -> CheckOutcome:
    """Every module must have seen examples, its two factors the same number of them.

    Counts differ legitimately across modules (Conv2d counts spatial positions, masked tokens vary),
    so the spread across modules is recorded as a metric, not judged.
    """
    outcome = CheckOutcome(metrics={"activation_examples": dict(activation_counts)})
    for module in sorted(set(activation_counts) | set(gradient_counts)):
        activation = activation_counts.get(module, 0.0)
        gradient = gradient_counts.get(module, 0.0)
        if min(activation, gradient) <= 0:
            outcome.findings.append(
                fail(
                    "covariance.examples",
                    f"No examples reached {module}: its covariance factors are empty.",
                    subject=module,
                    value=float(min(activation, gradient)),
                    limit=1.0,
                )
            )
        elif activation != gradient:
            outcome.findings.append(
                warn(
                    "covariance.examples_equal",
                    f"{module} saw {fmt(activation)} examples for its activation covariance but "
                    f"{fmt(gradient)} for its gradient covariance.",
                    subject=module,
                    value=float(abs(activation - gradient)),
                    limit=0.0,
                )
            )
    return outcome
