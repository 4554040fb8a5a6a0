"""Checks on stored eigendecompositions Q, λ of each covariance factor.

Only products with the stored Q are formed (O(d³) matmuls, estimated with probes for large d): the
eigendecomposition itself is never repeated.
"""

from __future__ import annotations

import math

import torch

from influence_doctor.causes import (
    DTYPE_DRIFT,
    EIGENDECOMPOSITION_FAILED,
    EIGENDECOMPOSITION_INACCURATE,
    NOT_PSD,
    RANK_DEFICIENT,
)
from influence_doctor.checks.measures import (
    effective_rank,
    nonfinite_count,
    orthogonality_error,
    reconstruction_error,
    rounding_floor,
    spectrum_extremes,
)
from influence_doctor.checks.outcome import CheckOutcome, dtype_name, fmt
from influence_doctor.checks.thresholds import Thresholds, eps
from influence_doctor.findings import fail, warn


def coarsest(*dtypes: torch.dtype | None) -> torch.dtype:
    """The least precise of the given floating dtypes: the precision a result can claim."""
    present = [d for d in dtypes if d is not None and d.is_floating_point]
    return max(present, key=eps) if present else torch.float64


def check_eigenpairs(
    values: torch.Tensor,
    vectors: torch.Tensor,
    subject: str,
    thresholds: Thresholds,
    *,
    compute_dtype: torch.dtype = torch.float64,
    source_dtype: torch.dtype | None = None,
    precondition_dtype: torch.dtype = torch.float32,
    covariance: torch.Tensor | None = None,
) -> CheckOutcome:
    """Finite, orthonormal, reconstructs C, PSD, effective rank, and stored vs computed precision.

    `compute_dtype` is `eigendecomposition_dtype`; `source_dtype` the covariance's stored dtype;
    `precondition_dtype` the precision the scores will use Q in; `covariance` the normalised C.
    """
    outcome = CheckOutcome()
    size = int(values.shape[0]) if values.ndim == 1 else 0
    stored = vectors.dtype
    outcome.metrics.update(size=size, stored_dtype=dtype_name(stored), compute_dtype=dtype_name(compute_dtype))
    bad = nonfinite_count(values) + nonfinite_count(vectors)
    if bad:
        outcome.findings.append(
            fail(
                "eigendecomposition.finite",
                f"The eigendecomposition returned {bad} inf/NaN entries: its input was not a valid matrix.",
                subject=subject,
                value=float(bad),
                limit=0.0,
                cause=EIGENDECOMPOSITION_FAILED,
            )
        )
        return outcome
    if size == 0 or vectors.shape != (size, size):
        return outcome
    drift = eps(stored) > eps(precondition_dtype)
    orthogonality = orthogonality_error(vectors)
    # Rounding Q to the precondition dtype moves it ~eps from orthonormal; eigh itself ~√d·eps of its dtype.
    limit = thresholds.eigendecomposition.orthogonality_eps * (
        eps(precondition_dtype) + math.sqrt(size) * eps(compute_dtype)
    )
    outcome.metrics["orthogonality_error"] = orthogonality
    if orthogonality > limit:
        outcome.findings.append(
            fail(
                "eigendecomposition.orthogonality" if not drift else "eigendecomposition.stored_dtype",
                f"Eigenvectors computed in {dtype_name(compute_dtype)} were stored in {dtype_name(stored)}: "
                f"‖QᵀQ−I‖ is {fmt(orthogonality)}, too coarse for {dtype_name(precondition_dtype)} "
                f"preconditioning ({fmt(limit)})."
                if drift
                else f"‖QᵀQ−I‖ is {fmt(orthogonality)}: the eigenvectors are not orthonormal ({fmt(limit)}).",
                subject=subject,
                value=orthogonality,
                limit=limit,
                cause=DTYPE_DRIFT if drift else EIGENDECOMPOSITION_INACCURATE,
            )
        )
    precision = coarsest(compute_dtype, source_dtype, values.dtype)
    if covariance is not None and covariance.shape == vectors.shape:
        error = reconstruction_error(vectors, values, covariance)
        limit = (
            thresholds.eigendecomposition.reconstruction_eps * math.sqrt(size) * eps(coarsest(compute_dtype, stored))
        )
        outcome.metrics["reconstruction_error"] = error
        if error > limit:
            outcome.findings.append(
                fail(
                    "eigendecomposition.reconstruction",
                    f"QΛQᵀ differs from the covariance by {fmt(error)} (relative), above {fmt(limit)}.",
                    subject=subject,
                    value=error,
                    limit=limit,
                    cause=EIGENDECOMPOSITION_INACCURATE,
                )
            )
    smallest, largest, _mean = spectrum_extremes(values)
    negative_limit = -thresholds.eigendecomposition.negative_eigenvalue_eps * rounding_floor(
        values, precision, compute_dtype
    )
    rank = effective_rank(values, thresholds.eigendecomposition.effective_rank_eps, precision, compute_dtype)
    condition = largest / smallest if smallest > 0 else math.inf
    outcome.metrics.update(
        min_eigenvalue=smallest,
        max_eigenvalue=largest,
        condition_number=condition,
        effective_rank=rank,
        rank_fraction=rank / size,
    )
    if smallest < negative_limit:
        outcome.findings.append(
            fail(
                "eigendecomposition.psd",
                f"The smallest eigenvalue is {fmt(smallest)}: a covariance must be positive semidefinite.",
                subject=subject,
                value=smallest,
                limit=negative_limit,
                cause=NOT_PSD,
            )
        )
    if rank < thresholds.eigendecomposition.rank_deficient_fraction * size:
        outcome.findings.append(
            warn(
                "eigendecomposition.effective_rank",
                f"Only {rank} of {size} eigenvalues are above rounding: the factor is rank-deficient.",
                subject=subject,
                value=float(rank),
                limit=thresholds.eigendecomposition.rank_deficient_fraction * size,
                cause=RANK_DEFICIENT,
            )
        )
    return outcome
