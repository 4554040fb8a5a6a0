"""The rules that explain the derived limits of `thresholds.py` (SPEC 4.1).

A heuristic limit is only as good as its false-alarm rate on runs that are known to be fine, so each
derived default is a rule applied to generated healthy cases: tiny torch models really trained on
synthetic data (loss curves) and small pipelines really run through kronfluence (score matrices). The
generator lives outside the library, in `benchmarks/calibration/` (`python -m benchmarks.calibration`
prints each rule's derivation beside the value in use), and tests hold the constants to what these rules
derive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LimitRule:
    """A threshold set from healthy cases: the `percentile` of `metric` over them, times `margin`, to two
    significant digits. The percentile 1.0 is the largest healthy value."""

    threshold: str
    metric: str
    percentile: float
    margin: float

    def derive(self, values: Sequence[float]) -> float:
        finite = sorted(value for value in values if math.isfinite(value))
        if not finite:
            return math.nan
        at = finite[min(len(finite) - 1, int(self.percentile * len(finite)))] if self.percentile < 1.0 else finite[-1]
        return float(f"{at * self.margin:.2g}")


LIMIT_RULES: tuple[LimitRule, ...] = (
    # warnings: the 99.5th healthy percentile, so about 0.5% of healthy runs warn
    LimitRule("loss_rise_significance", "loss_rise_significance", 0.995, 1.0),
    LimitRule("max_generalization_gap", "generalization_gap", 0.995, 1.0),
    LimitRule("trained_loss_warn_ratio", "trained_loss_ratio", 0.995, 1.0),
    # failures: the largest healthy value × 1.5
    LimitRule("loss_rise_fail_significance", "loss_rise_significance", 1.0, 1.5),
    LimitRule("start_rise_significance", "start_rise_significance", 1.0, 1.5),
    LimitRule("divergence_significance", "divergence_significance", 1.0, 1.5),
    LimitRule("oscillation_significance", "oscillation_significance", 1.0, 1.5),
    LimitRule("trained_loss_fail_ratio", "reference_loss_ratio", 1.0, 1.5),
    # against the start alone (no fresh copy measured): ×3, as restarting an optimizer on a converged
    # model lifts a near-zero loss severalfold
    LimitRule("trained_loss_unreferenced_fail_ratio", "trained_loss_ratio", 1.0, 3.0),
    LimitRule("uphill_cosine", "uphill_cosine", 1.0, 1.5),
    LimitRule("explosion_height", "explosion_height", 1.0, 1.5),
)
"""The training limits derived from healthy curves (the metrics of `check_loss_curve`). The rest are
definitions, stated: `divergence_ratio` (3× the lowest level), `start_rise_ratio` (2× the first loss),
`divergence_min_share` (a climb undoing 1% of an untrained model's loss), the oscillation's amplitude and
progress, the window sizes."""

SCORE_LIMIT_RULES: tuple[LimitRule, ...] = (
    # score heuristics only warn: each at the 99.5th healthy percentile
    LimitRule("outlier_mad", "pairwise_max_robust_z", 0.995, 1.0),
    LimitRule("self_outlier_mad", "self_max_robust_z", 0.995, 1.0),
    LimitRule("query_scale_ratio", "query_scale_ratio", 0.995, 1.0),
    LimitRule("module_dominance_share", "dominant_share", 0.995, 1.0),
)
"""The score limits derived from healthy pipelines run through kronfluence (the largest robust z of the
pairwise and of the self scores, the query scale ratio, the dominant module's share). The 99.5th
percentile of 200 cases is the largest, so one pipeline's float rounding decides it: the derivation
varies by a few percent between CPUs, and the tests hold these constants to it within 10%."""

DERIVATION_CURVES = 600
DERIVATION_SEED = 0
"""The healthy curves the limits are derived from; rates are measured on other seeds."""

SEEDS_USED: dict[int, str] = {
    0: "derived every limit (the derivation sets: 600 healthy runs, 200 healthy pipelines)",
    1: "informed the margins (×1.5, ×3 over the largest healthy value) and, on 2026-12-06, the choice of a "
    "directional t test for the uphill cosine (a steady-rise run whose gradient's signal-to-noise missed)",
    2: "informed the README's earlier rates and the reference-less detection drop (57/60) of a review",
    3: "informed the stated climb share (divergence_min_share)",
    4: "informed the README's earlier rates",
    5: "informed a review's reference-less detection drop (58/60) and its warn rates",
    6: "informed a review's warn rates",
    7: "informed a review's warn rates",
    8: "informed a review's false uphill fail (run 44), and its warn rates",
    9: "informed a review's warn rates",
    10: "informed a review's warn rates",
    11: "informed a review's warn rates",
}
"""Every calibration seed that derived a limit or informed a margin, a stated choice or a change: rates are
reported only on seeds not listed here (`fresh_seed`), and a seed used for a rate is added once a change
follows from it."""


def fresh_seed(seed: int) -> bool:
    """A seed no limit, margin, stated choice or change was drawn from: the only kind a rate may be reported on."""
    return seed not in SEEDS_USED


SCORE_DERIVATION_CASES = 200
"""Healthy pipelines (seed `DERIVATION_SEED`) the score limits are derived from (about 45 s on one core)."""
