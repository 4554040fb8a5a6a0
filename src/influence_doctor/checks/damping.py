"""How much the rankings depend on the damping: reported, never judged.

Damping is the user's modeling choice. The doctor measures each query's ranking under every module's
damping ×10 and says how much it moved, as `info`, so a person can weigh the choice with a number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from influence_doctor.checks.outcome import CheckOutcome
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.findings import info


def check_damping_sensitivity(stage: str, agreement: Mapping[str, float], thresholds: Thresholds) -> CheckOutcome:
    """`scores.damping_sensitivity` (info): per-query rank agreement with every module's damping ×10."""
    spearman = agreement.get("median_spearman", math.nan)
    outcome = CheckOutcome(metrics={"damping_x10": dict(agreement)})
    if math.isnan(spearman):
        return outcome
    moved = spearman < thresholds.scores.damping_sensitivity_min_spearman
    outcome.findings.append(
        info(
            "scores.damping_sensitivity",
            f"With every module's damping ×10 the rankings agree at Spearman {spearman:.3f}"
            + (
                f" (median per query; worst query {agreement.get('worst_spearman', math.nan):.3f}): "
                if agreement.get("rows", 1.0) > 1
                else ": "
            )
            + (
                "they depend on the damping, which is your modeling choice."
                if moved
                else "they depend little on the damping."
            ),
            value=spearman,
            limit=thresholds.scores.damping_sensitivity_min_spearman,
            stage=stage,
        )
    )
    return outcome


def check_low_rank_cost(stage: str, rank: int, agreement: Mapping[str, float]) -> CheckOutcome:
    """`scores.low_rank_cost` (info): per-query rank agreement of the low-rank query gradients with full
    rank. Like damping, `query_gradient_low_rank` is an approximation the user chose; the doctor says
    what it costs, in the rankings a person reads."""
    spearman = agreement.get("median_spearman", math.nan)
    worst, overlap = agreement.get("worst_spearman", math.nan), agreement.get("top_overlap", math.nan)
    outcome = CheckOutcome(metrics={"low_rank_vs_full": {"rank": rank, **dict(agreement)}})
    if math.isnan(spearman):
        return outcome
    outcome.findings.append(
        info(
            "scores.low_rank_cost",
            f"Query gradients at rank {rank} (query_gradient_low_rank) rank the training examples as full "
            f"rank does at a median per-query Spearman of {spearman:.3f} (worst query {worst:.3f}, top-10 overlap "
            f"{overlap:.2f}): "
            "the approximation's cost, your choice to weigh.",
            value=spearman,
            stage=stage,
        )
    )
    return outcome
