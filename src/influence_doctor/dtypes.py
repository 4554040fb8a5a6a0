"""kronfluence's precision settings, grouped by the stage whose arithmetic they govern.

Experiments raise one group at a time ("one stage's dtype"), remedies climb a group's dtype ladder,
and the precision verdicts are held to the coarsest dtype on the path to the scores.
"""

from __future__ import annotations

from typing import Any

import torch

DTYPE_ORDER: dict[torch.dtype, int] = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
"""Range and precision together: fp16 (narrow range) < bf16 (fp32's range, coarse) < fp32 < fp64."""

DTYPE_GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "amp": ("factor_args", ("amp_dtype",)),
    "covariance": ("factor_args", ("activation_covariance_dtype", "gradient_covariance_dtype")),
    "eigendecomposition": ("factor_args", ("eigendecomposition_dtype",)),
    "lambda": ("factor_args", ("per_sample_gradient_dtype", "lambda_dtype")),
    "score_amp": ("score_args", ("amp_dtype",)),
    "scores": ("score_args", ("per_sample_gradient_dtype", "precondition_dtype", "score_dtype")),
}
"""Group → (which arguments, which fields). The covariance dtypes are also the dtype kronfluence stores
eigenvectors in, so eigenvector precision is the covariance group's."""

GROUP_STAGE: dict[str, str] = {
    "amp": "covariance",
    "covariance": "covariance",
    "eigendecomposition": "eigendecomposition",
    "lambda": "lambda",
    "score_amp": "scores",
    "scores": "scores",
}
"""Where a group's arithmetic first happens ("scores" stands for the pipeline's score stage)."""

UPSTREAM: dict[str, tuple[str, ...]] = {
    "covariance": ("amp", "covariance"),
    "eigendecomposition": ("amp", "covariance", "eigendecomposition"),
    "lambda": ("amp", "covariance", "eigendecomposition", "lambda"),
    "pairwise_scores": ("amp", "covariance", "eigendecomposition", "lambda", "score_amp", "scores"),
    "self_scores": ("amp", "covariance", "eigendecomposition", "lambda", "score_amp", "scores"),
}
"""The groups whose precision can affect what a stage produced, earliest first."""


def dtype_name(dtype: Any) -> str:
    return "None" if dtype is None else str(dtype).replace("torch.", "")


def group_dtypes(factor_args: Any, score_args: Any, group: str) -> list[torch.dtype | None]:
    holder_name, fields = DTYPE_GROUPS[group]
    holder = factor_args if holder_name == "factor_args" else score_args
    return [getattr(holder, name) for name in fields]


def is_below(dtype: torch.dtype | None, target: torch.dtype, group: str) -> bool:
    """Whether `dtype` is coarser than `target`; an unset autocast (None) computes in full precision."""
    if dtype is None:
        return False
    return DTYPE_ORDER.get(dtype, 3) < DTYPE_ORDER[target]


def groups_in_use(factor_args: Any, stage: str) -> tuple[str, ...]:
    """The groups that feed `stage` under the configured strategy (K-FAC fits no Λ, diagonal no covariance)."""
    from kronfluence.factor.config import FactorConfig

    strategy = FactorConfig.CONFIGS[factor_args.strategy]
    unused = set()
    if not strategy.requires_covariance_matrices:
        unused |= {"covariance"}
    if not strategy.requires_eigendecomposition:
        unused |= {"eigendecomposition"}
    if not strategy.requires_lambda_matrices:
        unused |= {"lambda"}
    return tuple(group for group in UPSTREAM.get(stage, ()) if group not in unused)


def score_path_dtype(factor_args: Any, score_args: Any) -> torch.dtype:
    """The least precise dtype (largest epsilon) any stage on the way to the scores computes or stores in."""
    groups = groups_in_use(factor_args, "pairwise_scores")
    dtypes = [d for group in groups for d in group_dtypes(factor_args, score_args, group)]
    present = [d for d in dtypes if isinstance(d, torch.dtype) and d.is_floating_point]
    return max(present, key=lambda d: torch.finfo(d).eps) if present else torch.float64
