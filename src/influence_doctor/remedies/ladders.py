"""The escalation ladders: for each cause, rungs from cheapest and least distorting to strongest.

A rung is a string `kind:argument` (see `rungs.py` for what each kind changes). Override any ladder
under `[tool.influence-doctor.ladders]`, e.g. `tiny-damping = ["damping:heuristic"]`.
"""

from __future__ import annotations

from collections.abc import Mapping

DTYPE_RUNGS = ("dtype:bfloat16", "dtype:float32", "dtype:float64")
EIGEN_RUNGS = (
    "eigendecomposition-dtype:float64",
    "covariance-dtype:float32",
    "covariance-dtype:float64",
    "shift:1e-6",
)
SHIFT_RUNGS = ("shift:1e-6", "shift:1e-4", "shift:1e-2", "shift:0.1", "shift-trace:0.2")
DAMPING_RUNGS = ("damping:heuristic", "damping:heuristic-x10")
MEMORY_RUNGS = ("partitions:x2", "offload:on", "iterative-lambda:on", "batch:half")
STRATEGY_FALLBACK = ("strategy:kfac", "strategy:diagonal", "strategy:identity")

DEFAULT_LADDERS: dict[str, tuple[str, ...]] = {
    "fp16-overflow": DTYPE_RUNGS,
    "low-precision-loss": DTYPE_RUNGS,
    "dtype-drift": ("dtype:float32", "dtype:float64"),
    "eigendecomposition-failed": EIGEN_RUNGS,
    "eigendecomposition-inaccurate": EIGEN_RUNGS,
    # A shift lifts a singular covariance; EK-FAC refits Λ from gradients, where only damping helps,
    # so the damping rungs follow (shift rungs are skipped when they cannot reach the failing spectrum).
    "ill-conditioned": SHIFT_RUNGS + DAMPING_RUNGS,
    "rank-deficient": SHIFT_RUNGS + DAMPING_RUNGS,
    "not-psd": SHIFT_RUNGS,
    "asymmetric": ("shift:1e-6",),
    "tiny-damping": DAMPING_RUNGS,
    "score-outliers": DAMPING_RUNGS,
    "out-of-memory": MEMORY_RUNGS,
}
"""Cause tag → rungs. Causes absent here (broken model, broken training) have no factor-setting fix."""


def ladder_for(cause: str | None, overrides: Mapping[str, list[str]] | None = None) -> tuple[str, ...]:
    """The rungs to climb for `cause`, then the strategy fallback for anything still failing."""
    if cause is None:
        return STRATEGY_FALLBACK
    rungs = tuple((overrides or {}).get(cause, DEFAULT_LADDERS.get(cause, ())))
    return rungs + tuple(r for r in STRATEGY_FALLBACK if r not in rungs)
