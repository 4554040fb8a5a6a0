"""Checks on influence scores: finite, no absurd outliers, self-influence ≥ 0, no dominant module,
and stable rankings when the damping changes."""

from __future__ import annotations

import math

import torch

from influence_doctor.causes import FP16_OVERFLOW, NOT_PSD, SCORE_OUTLIERS
from influence_doctor.checks.measures import as_float64, robust_z_max
from influence_doctor.checks.outcome import CheckOutcome, fmt
from influence_doctor.checks.thresholds import Thresholds, eps
from influence_doctor.findings import Finding, fail, warn


def total_scores(per_module: dict[str, torch.Tensor], keep_tokens: bool = False) -> torch.Tensor:
    """One score per (query, training example), or per training example for self-influence.

    kronfluence stores `all_modules`, or one tensor per module with per-module scores on: they are
    summed. Per-token pairwise scores (`compute_per_token_scores`, shape queries × examples × tokens)
    are summed over tokens too, unless `keep_tokens`: rankings are compared on what an example
    contributes in all. Self-influence is never per token."""
    if "all_modules" in per_module:
        total = per_module["all_modules"]
    else:
        tensors = list(per_module.values())
        total = tensors[0].clone()
        for tensor in tensors[1:]:
            total += tensor
    if keep_tokens or total.ndim <= 2:
        return total
    return total.sum(dim=tuple(range(2, total.ndim)))


def tokens_of(per_module: dict[str, torch.Tensor]) -> int | None:
    """Token positions per example when the pairwise scores are per token, else None."""
    tensor = next(iter(per_module.values()), None)
    return int(tensor.shape[-1]) if tensor is not None and tensor.ndim > 2 else None


def finite_fraction(scores: torch.Tensor) -> float:
    """Share of entries that are finite; an empty tensor counts as fully finite."""
    if scores.numel() == 0:
        return 1.0
    return float(torch.isfinite(scores).float().mean().item())


def check_scores_finite(
    stage: str, subject: str, scores: torch.Tensor, min_fraction: float = 1.0, cause: str | None = None
) -> list[Finding]:
    """Every score must be finite: a single inf or NaN poisons rankings and sums.

    `min_fraction` defaults to 1.0 because no share of non-finite scores is harmless.
    """
    fraction = finite_fraction(scores)
    if fraction >= min_fraction:
        return []
    broken = ~torch.isfinite(scores)
    bad = int(broken.sum().item())
    return [
        fail(
            "scores.finite",
            f"{bad} of {scores.numel()} {subject} scores are inf or NaN, the first at "
            f"{_position(broken, scores.ndim)}.",
            subject=subject,
            value=fraction,
            limit=min_fraction,
            cause=cause,
            stage=stage,
        )
    ]


POSITION_NAMES = {1: ("training example",), 2: ("query", "training example"), 3: ("query", "training example", "token")}
"""What each axis of a score tensor indexes (positions in the analysed subsets)."""


def _position(mask: torch.Tensor, ndim: int) -> str:
    """Where the first True of `mask` lies, named by axis: 'query 2, training example 17, token 5'."""
    flat = int(mask.flatten().nonzero()[0].item())
    index = []
    for size in reversed(mask.shape):
        index.append(flat % size)
        flat //= size
    names = POSITION_NAMES.get(ndim, tuple(f"axis {axis}" for axis in range(ndim)))
    return ", ".join(f"{name} {value}" for name, value in zip(names, reversed(index), strict=True))


def check_scores(
    stage: str,
    subject: str,
    scores: torch.Tensor,
    thresholds: Thresholds,
    *,
    overflow_prone: bool = False,
    per_token: torch.Tensor | None = None,
) -> CheckOutcome:
    """Finite share, robust outliers (median/MAD) and, for self-influence, non-negativity.

    Non-finite and negative self-influence are measured wrong results (`fail`); outliers are a
    heuristic (`warn`): influence is heavy-tailed by nature, so its limit is calibrated on healthy
    pipelines (`checks/rules.py`; `benchmarks.calibration` generates them). `scores` is one score per
    example; with per-token scores (`per_token`, queries × examples × tokens) finiteness is checked per
    token, so that the message names the token, and the largest token score is located in the metrics."""
    finest = scores if per_token is None else per_token
    outcome = CheckOutcome(metrics={"finite_fraction": finite_fraction(finest)})
    outcome.findings += check_scores_finite(
        stage,
        subject,
        finest,
        cause=FP16_OVERFLOW.tag if overflow_prone and bool(torch.isinf(finest).any()) else None,
    )
    if per_token is not None:
        outcome.metrics["per_token"] = _token_extremes(per_token)
    z = robust_z_max(scores)
    outcome.metrics["max_robust_z"] = z
    limit = thresholds.scores.self_outlier_mad if subject == "self" else thresholds.scores.outlier_mad
    if not math.isnan(z) and z > limit:
        outcome.findings.append(
            warn(
                "scores.outliers",
                f"A {subject} score lies {fmt(z)} robust SDs from the median, beyond what healthy "
                "pipelines produce: a few examples may dominate the rankings.",
                subject=subject,
                value=z,
                limit=limit,
                cause=SCORE_OUTLIERS,
                stage=stage,
            )
        )
    if subject == "self":
        values = as_float64(scores)
        values = values[torch.isfinite(values)]
        if values.numel():
            lowest = float(values.min().item())
            limit = (
                -thresholds.scores.negative_self_influence_eps * eps(scores.dtype) * float(values.abs().max().item())
            )
            outcome.metrics["min_self_influence"] = lowest
            if lowest < limit:
                negatives = int((values < limit).sum().item())
                outcome.findings.append(
                    fail(
                        "scores.self_nonnegative",
                        f"{negatives} self-influence scores are negative (lowest {fmt(lowest)}): "
                        "gᵀ(H+δ)⁻¹g cannot be negative when the curvature is positive semidefinite.",
                        subject=subject,
                        value=lowest,
                        limit=limit,
                        cause=NOT_PSD,
                        stage=stage,
                    )
                )
    return outcome


def _token_extremes(per_token: torch.Tensor) -> dict[str, object]:
    """The largest |token score|, where it lies, and how many robust SDs it is from the median token score."""
    values = as_float64(per_token)
    finite = torch.isfinite(values)
    if not bool(finite.any()):
        return {"tokens": int(per_token.shape[-1])}
    magnitude = values.abs().masked_fill(~finite, -1.0)
    largest = magnitude == magnitude.max()
    return {
        "tokens": int(per_token.shape[-1]),
        "largest": float(values[largest].flatten()[0].item()),
        "largest_at": _position(largest, per_token.ndim),
        "max_robust_z": robust_z_max(values),
    }


def check_query_scale(stage: str, scores: torch.Tensor, thresholds: Thresholds) -> CheckOutcome:
    """One query whose scores dwarf the median query's: its gradient may live in near-flat directions
    of the curvature, which only damping bounds (out-of-distribution queries do this). A heuristic
    (`warn`): in-distribution queries vary in scale too, so the limit is calibrated on healthy pipelines."""
    outcome = CheckOutcome()
    if scores.ndim != 2 or scores.shape[0] < 3 or scores.shape[1] == 0:
        return outcome
    typical = as_float64(scores).abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).median(dim=1).values
    center = float(typical.median().item())
    if center <= 0.0:
        return outcome
    ratio = float(typical.max().item()) / center
    outcome.metrics["query_scale_ratio"] = ratio
    if ratio > thresholds.scores.query_scale_ratio:
        query = int(typical.argmax().item())
        outcome.findings.append(
            warn(
                "scores.query_scale",
                f"Query {query}'s scores are typically {fmt(ratio)}× those of the median query: "
                "it may fall where the curvature is nearly flat (out of distribution).",
                subject=f"query {query}",
                value=ratio,
                limit=thresholds.scores.query_scale_ratio,
                cause=SCORE_OUTLIERS,
                stage=stage,
            )
        )
    return outcome


def check_module_dominance(stage: str, per_module: dict[str, torch.Tensor], thresholds: Thresholds) -> CheckOutcome:
    """Share of total |score| mass per module; one module carrying nearly all of it hides the rest."""
    masses = {
        name: float(as_float64(tensor).nan_to_num(0.0, 0.0, 0.0).abs().sum().item())
        for name, tensor in per_module.items()
        if name != "all_modules"
    }
    total = sum(masses.values())
    outcome = CheckOutcome()
    if len(masses) < 2 or total <= 0.0:
        return outcome
    top_module, top_mass = max(masses.items(), key=lambda item: item[1])
    share = top_mass / total
    outcome.metrics["dominant_module"] = top_module
    outcome.metrics["dominant_share"] = share
    if share > thresholds.scores.module_dominance_share:
        outcome.findings.append(
            warn(
                "scores.module_dominance",
                f"{top_module} carries {share:.0%} of all score mass: the other modules barely count.",
                subject=top_module,
                value=share,
                limit=thresholds.scores.module_dominance_share,
                stage=stage,
            )
        )
    return outcome
