"""The bytes kronfluence stores for the factors: exact, from module shapes and the configured dtypes."""

from __future__ import annotations

from typing import Any

import torch


def factor_bytes(run: Any) -> dict[str, int]:
    """Bytes kronfluence stores per factor kind under the final arguments; exact, from module shapes."""
    covariance = run.artifacts.get("covariance") or {}
    sizes = {
        module: (int(a.shape[0]), int(covariance["gradient_covariance"][module].shape[0]))
        for module, a in covariance.get("activation_covariance", {}).items()
    }
    fa = run.factor_args
    act, grad = _itemsize(fa.activation_covariance_dtype), _itemsize(fa.gradient_covariance_dtype)
    totals = {"covariance": 0, "eigendecomposition": 0, "lambda": 0}
    for d_a, d_g in sizes.values():
        totals["covariance"] += d_a * d_a * act + d_g * d_g * grad
        if fa.strategy in ("kfac", "ekfac"):
            # eigenvectors and eigenvalues are stored in the covariance's dtype
            totals["eigendecomposition"] += (d_a * d_a + d_a) * act + (d_g * d_g + d_g) * grad
        if fa.strategy in ("ekfac", "diagonal"):
            totals["lambda"] += d_a * d_g * _itemsize(fa.lambda_dtype)
    return totals


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
