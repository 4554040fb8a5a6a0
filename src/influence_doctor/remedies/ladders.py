"""The escalation ladders: rungs from cheapest and least distorting to strongest, as data.

A rung is a change `kind:argument` (see `changes.py` for what each kind changes). Each cause's default
ladder is part of its row in `diagnosis/causes.py`, which also says how a ladder is climbed
(`ladder_for`); override any ladder under `[tool.influence-doctor.ladders]`, e.g.
`tiny-damping = ["damping:heuristic"]`.
"""

from __future__ import annotations

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
"""The last resort for anything still failing: each changes the quantity computed, so each is held to the
same fidelity bar against float64 of the strategy asked for, and the report says the method changed."""
