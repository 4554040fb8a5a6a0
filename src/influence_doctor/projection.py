"""What the full run will cost, projected from the rehearsal: factor memory exactly (from shapes and
dtypes), stage time by how each stage scales with the number of training examples and queries."""

from __future__ import annotations

from typing import Any

import torch

from influence_doctor.runner.run import Run

SCALING = {
    "covariance": "examples",
    "eigendecomposition": "constant",  # one eigh per factor, whatever the data size
    "lambda": "examples",
    "pairwise_scores": "examples×queries",
    "self_scores": "examples",
}
"""How each stage's time grows; kronfluence's passes are linear in what they iterate over."""


def factor_bytes(run: Run) -> dict[str, int]:
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


def project(run: Run) -> dict[str, Any]:
    """The full run's factor memory and per-stage time, from this rehearsal's measurements."""
    rehearsed = max(len(run.train_indices), 1)
    full = max(run.train_examples_total, 1)
    queries_rehearsed = max(len(run.query_indices), 1)
    queries_full = max(run.query_examples_total, queries_rehearsed)
    examples = full / rehearsed
    scale = {"constant": 1.0, "examples": examples, "examples×queries": examples * queries_full / queries_rehearsed}
    stages = {}
    for name, how in SCALING.items():
        seconds = run.stages[name].seconds
        if run.stages[name].completed and seconds is not None:
            stages[name] = {"rehearsal_seconds": seconds, "scales_with": how, "projected_seconds": seconds * scale[how]}
    memory = factor_bytes(run)
    return {
        "examples": {"rehearsal": rehearsed, "full": full},
        "queries": {"rehearsal": queries_rehearsed, "full": queries_full},
        "factor_bytes": memory,
        "peak_factor_bytes": sum(memory.values()),
        "stages": stages,
        "projected_seconds": sum(stage["projected_seconds"] for stage in stages.values()),
    }


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
