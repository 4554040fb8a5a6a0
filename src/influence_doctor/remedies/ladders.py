"""The escalation ladders: for each cause, rungs from cheapest and least distorting to strongest.

A rung is a string `kind:argument` (see `rungs.py` for what each kind changes). Each cause's default
ladder is part of its row in `diagnosis/causes.py`; override any ladder under
`[tool.influence-doctor.ladders]`, e.g. `tiny-damping = ["damping:heuristic"]`.
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
DAMPING_RUNGS = ("damping:floor", "damping:floor-x100", "damping:heuristic", "damping:heuristic-x10")
"""Smallest first: the rounding floor eps·λmax (the least damping that damps anything), 100× it,
kronfluence's heuristic (0.1× each module's mean eigenvalue), 10× that."""
MEMORY_RUNGS = ("partitions:x2", "offload:on", "iterative-lambda:on", "batch:half")
STRATEGY_FALLBACK = ("strategy:kfac", "strategy:diagonal", "strategy:identity")


def default_ladders() -> dict[str, tuple[str, ...]]:
    """Cause tag → rungs, from the cause table. Causes without one (a broken model) have no fix."""
    from influence_doctor.diagnosis.causes import ladders

    return ladders()


def ladder_for(cause: str | None, overrides: Mapping[str, list[str]] | None = None) -> tuple[str, ...]:
    """The rungs to climb for `cause`, then the strategy fallback for anything still failing."""
    if cause is None:
        return STRATEGY_FALLBACK
    rungs = tuple((overrides or {}).get(cause, default_ladders().get(cause, ())))
    return rungs + tuple(r for r in STRATEGY_FALLBACK if r not in rungs)
