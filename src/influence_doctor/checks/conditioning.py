"""Conditioning of the damped curvature spectrum that preconditioning divides by (Λ+δ)."""

from __future__ import annotations

import math

import torch

from influence_doctor.causes import ILL_CONDITIONED, TINY_DAMPING
from influence_doctor.checks.measures import damped_condition
from influence_doctor.checks.outcome import CheckOutcome, dtype_name, fmt
from influence_doctor.checks.spectra import effective_damping
from influence_doctor.checks.thresholds import Thresholds, eps
from influence_doctor.findings import info, warn


def check_damped_spectrum(
    smallest: float,
    largest: float,
    mean: float,
    damping_factor: float | None,
    precondition_dtype: torch.dtype,
    subject: str,
    stage: str,
    thresholds: Thresholds,
) -> CheckOutcome:
    """cond(Λ+δ) against the precondition dtype's precision, and whether δ is lost in rounding.

    Both are bounds, not measurements: a large cond·eps says precision *may* be lost, which the
    float64 counterfactual then confirms or refutes. So this is a `warn` at most (and the damping
    floor an `info`). The suspected cause is the damping when δ is below eps·λmax, else the spectrum.
    """
    delta = effective_damping(damping_factor, mean)
    condition = damped_condition(smallest, largest, delta)
    unit = eps(precondition_dtype)
    floor = thresholds.eigendecomposition.damping_floor_eps * unit * largest if math.isfinite(largest) else math.nan
    below_floor = bool(delta < floor) if math.isfinite(floor) else False
    outcome = CheckOutcome(
        metrics={
            "damping": delta,
            "damping_floor": floor,
            "condition_after_damping": condition,
            "min_eigenvalue": smallest,
            "max_eigenvalue": largest,
        }
    )
    if below_floor:
        outcome.findings.append(
            info(
                f"{stage}.damping_floor",
                f"The damping {fmt(delta)} is below eps·λmax = {fmt(floor)}: it damps nothing.",
                subject=subject,
                value=delta,
                limit=floor,
                cause=TINY_DAMPING,
                stage=stage,
            )
        )
    if math.isnan(condition):
        return outcome
    error = condition * unit
    if error <= thresholds.eigendecomposition.max_condition_error:
        return outcome
    limit = thresholds.eigendecomposition.max_condition_error / unit
    reason = (
        f"the damping {fmt(delta)} is below eps·λmax = {fmt(floor)} and vanishes in rounding"
        if below_floor
        else f"the spectrum spans {fmt(largest)} down to {fmt(smallest)}"
    )
    outcome.findings.append(
        warn(
            f"{stage}.condition",
            f"cond(Λ+δ) is {fmt(condition)}, more than {dtype_name(precondition_dtype)} preconditioning "
            f"is sure to resolve ({fmt(limit)}): {reason}; the float64 re-run tells whether precision is lost.",
            subject=subject,
            value=condition,
            limit=limit,
            cause=TINY_DAMPING if below_floor else ILL_CONDITIONED,
            stage=stage,
        )
    )
    return outcome
