"""Checks on influence scores."""

from __future__ import annotations

import torch

from influence_doctor.findings import Finding


def finite_fraction(scores: torch.Tensor) -> float:
    """Share of entries that are finite; an empty tensor counts as fully finite."""
    if scores.numel() == 0:
        return 1.0
    return float(torch.isfinite(scores).float().mean().item())


def check_scores_finite(
    stage: str, subject: str, scores: torch.Tensor, min_fraction: float = 1.0
) -> list[Finding]:
    """Every score must be finite: a single inf or NaN poisons rankings and sums.

    `min_fraction` defaults to 1.0 because no share of non-finite scores is harmless.
    """
    fraction = finite_fraction(scores)
    if fraction >= min_fraction:
        return []
    bad = int((~torch.isfinite(scores)).sum().item())
    return [
        Finding(
            check="scores.finite",
            stage=stage,
            subject=subject,
            severity="fail",
            value=fraction,
            limit=min_fraction,
            cause=None,
            message=f"{bad} of {scores.numel()} {subject} scores are inf or NaN.",
        )
    ]
