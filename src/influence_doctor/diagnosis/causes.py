"""The causes the doctor knows, as data: which symptoms suggest each, the experiment that confirms it,
and the ladder of remedies that treats it — experiments and rungs alike in the one vocabulary of
changes of `changes.py` (`dtype:float32`, `float64:end-to-end`, `damping:x10`, `shift:1e-6`, ...).

To add a cause, add one `CauseRule` to `CAUSE_RULES`: the symptom kinds that make it a suspect, a
function listing the hypotheses to test (each a short sequence of one-setting changes with the outcome
that would confirm it), and its ladder of rungs. Rules are tried in table order; the first hypothesis
whose experiments all come out as predicted names the cause. A rung is an experiment that is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from influence_doctor.diagnosis.symptoms import Symptom
from influence_doctor.dtypes import (
    GROUP_STAGE,
    group_dtypes,
    groups_in_use,
    is_below,
)
from influence_doctor.remedies.ladders import (
    DAMPING_RUNGS,
    DTYPE_RUNGS,
    EIGEN_RUNGS,
    MEMORY_RUNGS,
    SHIFT_RUNGS,
    STRATEGY_FALLBACK,
)

FLOAT64 = "float64:end-to-end"
"""The precision counterfactual: every dtype float64 and no autocast, the damping unchanged."""

OVERFLOW_PRONE = (torch.float16,)
"""Dtypes with float16's range: sums that are finite in float32 or bfloat16 overflow in them."""


@dataclass(frozen=True)
class Hypothesis:
    """A cause, where it starts, what its remedies act on, and the experiments that would confirm it:
    each step is a change in the vocabulary of `changes.py` (acting on this hypothesis's stage and
    setting) and whether it must clear the symptom or leave it standing."""

    cause: str
    stage: str
    setting: str | None
    steps: tuple[tuple[str, str], ...]  # (change, "clears" | "persists"), e.g. ("dtype:float32", "clears")


@dataclass(frozen=True)
class Context:
    """What the hypotheses depend on besides the symptom: the settings as configured."""

    factor_args: Any
    score_args: Any
    score_stage: str
    rank_deficient: bool = False  # the checks saw a factor with zero directions (dead units, low rank)


@dataclass(frozen=True)
class CauseRule:
    cause: str
    suggested_by: frozenset[str]  # symptom kinds
    hypotheses: Callable[[Symptom, Context], list[Hypothesis]]
    ladder: tuple[str, ...] = ()
    treatable: bool = True


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _stage_of(group: str, context: Context) -> str:
    stage = GROUP_STAGE[group]
    return context.score_stage if stage == "scores" else stage


def _raise(symptom: Symptom, context: Context, cause: str, prone: Callable[[torch.dtype], bool], target) -> list:
    """One hypothesis per group feeding the symptom's stage whose dtype `prone` accepts: raising it
    to `target` must clear the symptom."""
    hypotheses = []
    for group in groups_in_use(context.factor_args, symptom.stage):
        dtypes = group_dtypes(context.factor_args, context.score_args, group)
        if any(d is not None and prone(d) and is_below(d, target, group) for d in dtypes):
            step = (f"dtype:{_name(target)}", "clears")
            hypotheses.append(Hypothesis(cause, _stage_of(group, context), group, (step,)))
    return hypotheses


def _fp16_overflow(symptom: Symptom, context: Context) -> list[Hypothesis]:
    return _raise(symptom, context, "fp16-overflow", lambda d: d in OVERFLOW_PRONE, torch.float32)


def _low_precision(symptom: Symptom, context: Context) -> list[Hypothesis]:
    """One stage's dtypes raised to float64 at a time, then, when the loss is spread over several
    stages, all of them together (the float64 run itself, which the symptom was measured against)."""
    single = _raise(symptom, context, "low-precision-loss", lambda d: True, torch.float64)
    if len(single) > 1:
        stage = min((h.stage for h in single), key=_stage_order)
        single.append(Hypothesis("low-precision-loss", stage, "all", ((FLOAT64, "clears"),)))
    return single


def _stage_order(stage: str) -> int:
    from influence_doctor.pipeline import STAGES

    return STAGES.index(stage)


def _eigendecomposition_failed(symptom: Symptom, context: Context) -> list[Hypothesis]:
    if symptom.stage != "eigendecomposition":
        return []
    hypotheses = []
    for group in ("eigendecomposition", "covariance"):
        if any(is_below(d, torch.float64, group) for d in group_dtypes(context.factor_args, context.score_args, group)):
            step = ("dtype:float64", "clears")
            hypotheses.append(Hypothesis("eigendecomposition-failed", "eigendecomposition", group, (step,)))
    return hypotheses


def _dtype_drift(symptom: Symptom, context: Context) -> list[Hypothesis]:
    stored = group_dtypes(context.factor_args, context.score_args, "covariance")
    if not any(is_below(d, torch.float32, "covariance") for d in stored):
        return []
    step = ("dtype:float32", "clears")
    return [Hypothesis("dtype-drift", "eigendecomposition", "covariance", (step,))]


def _eigendecomposition_inaccurate(symptom: Symptom, context: Context) -> list[Hypothesis]:
    hypotheses = _eigendecomposition_failed(symptom, context)
    return [Hypothesis("eigendecomposition-inaccurate", h.stage, h.setting, h.steps) for h in hypotheses]


def _tiny_damping(symptom: Symptom, context: Context) -> list[Hypothesis]:
    """Not precision (float64 at the same damping still fails) and damping is what lifts it."""
    if symptom.stage not in ("pairwise_scores", "self_scores"):
        return []
    damping = ("damping:x10", "clears")
    if symptom.kind == "undefined":  # measured on the float64 trial already
        return [Hypothesis("tiny-damping", symptom.stage, "damping", (damping,))]
    return [Hypothesis("tiny-damping", symptom.stage, "damping", ((FLOAT64, "persists"), damping))]


def _singular(symptom: Symptom, context: Context) -> list[Hypothesis]:
    """eigh fails or negative curvature appears even in float64: the matrix itself needs lifting."""
    if symptom.stage != "eigendecomposition":
        return []
    cause = "rank-deficient" if context.rank_deficient else "ill-conditioned"
    steps = ((FLOAT64, "persists"), ("shift:1e-6", "clears"))
    return [Hypothesis(cause, "covariance", "covariance", steps)]


def _not_psd(symptom: Symptom, context: Context) -> list[Hypothesis]:
    steps = ((FLOAT64, "persists"), ("shift:1e-6", "clears"))
    return [Hypothesis("not-psd", symptom.stage, "covariance", steps)]


def _nonfinite_model(symptom: Symptom, context: Context) -> list[Hypothesis]:
    """inf/NaN that no precision removes comes from the model or its data."""
    return [Hypothesis("nonfinite-model", symptom.stage, None, ((FLOAT64, "persists"),))]


def _measured_directly(cause: str) -> Callable[[Symptom, Context], list[Hypothesis]]:
    """Causes whose symptom is itself the proof (a NaN weight, a diverged loss, an allocator failure)."""

    def hypotheses(symptom: Symptom, context: Context) -> list[Hypothesis]:
        named = {f.cause for f in symptom.findings if f.cause}
        if symptom.kind in ("training", "reduction", "examples", "preflight") and cause not in named:
            return []
        return [Hypothesis(cause, symptom.stage, None, ())]

    return hypotheses


CAUSE_RULES: tuple[CauseRule, ...] = (
    CauseRule("nonfinite-model", frozenset({"model"}), _measured_directly("nonfinite-model"), treatable=False),
    CauseRule("training-diverged", frozenset({"training"}), _measured_directly("training-diverged"), treatable=False),
    CauseRule(
        "training-oscillating", frozenset({"training"}), _measured_directly("training-oscillating"), treatable=False
    ),
    CauseRule("loss-not-summed", frozenset({"reduction"}), _measured_directly("loss-not-summed"), ("task:sum",)),
    CauseRule("batch-dependent", frozenset({"reduction"}), _measured_directly("batch-dependent"), treatable=False),
    CauseRule("nonfinite-examples", frozenset({"examples"}), _measured_directly("nonfinite-examples"), treatable=False),
    CauseRule("out-of-memory", frozenset({"oom", "preflight"}), _measured_directly("out-of-memory"), MEMORY_RUNGS),
    CauseRule("fp16-overflow", frozenset({"nonfinite", "raised", "projected"}), _fp16_overflow, DTYPE_RUNGS),
    CauseRule("eigendecomposition-failed", frozenset({"nonfinite", "raised"}), _eigendecomposition_failed, EIGEN_RUNGS),
    CauseRule("dtype-drift", frozenset({"orthogonality"}), _dtype_drift, ("dtype:float32", "dtype:float64")),
    CauseRule(
        "eigendecomposition-inaccurate",
        frozenset({"orthogonality", "reconstruction"}),
        _eigendecomposition_inaccurate,
        EIGEN_RUNGS,
    ),
    CauseRule("low-precision-loss", frozenset({"disagreement", "nonfinite", "negative"}), _low_precision, DTYPE_RUNGS),
    CauseRule("tiny-damping", frozenset({"nonfinite", "undefined"}), _tiny_damping, DAMPING_RUNGS),
    CauseRule("rank-deficient", frozenset({"raised"}), _singular, SHIFT_RUNGS),
    CauseRule("not-psd", frozenset({"negative"}), _not_psd, SHIFT_RUNGS),
    CauseRule("nonfinite-model", frozenset({"nonfinite"}), _nonfinite_model, treatable=False),
)
"""In the order they are tried: direct measurements, then the cheapest single-setting explanations."""


def rules_for(kind: str) -> list[CauseRule]:
    return [rule for rule in CAUSE_RULES if kind in rule.suggested_by]


def ladders() -> dict[str, tuple[str, ...]]:
    """Cause → its default ladder (the first rule naming a cause gives it), `ill-conditioned` like
    `rank-deficient`, whose hypotheses name either."""
    table: dict[str, tuple[str, ...]] = {}
    for rule in CAUSE_RULES:
        if rule.ladder and rule.cause not in table:
            table[rule.cause] = rule.ladder
    table.setdefault("ill-conditioned", SHIFT_RUNGS)
    return table


def default_ladders() -> dict[str, tuple[str, ...]]:
    """Cause tag → rungs, from the cause table. Causes without one (a broken model) have no fix."""
    return ladders()


def ladder_for(cause: str | None, overrides: Mapping[str, list[str]] | None = None) -> tuple[str, ...]:
    """The rungs to climb for `cause`, then the strategy fallback for anything still failing."""
    if cause is None:
        return STRATEGY_FALLBACK
    rungs = tuple((overrides or {}).get(cause, ladders().get(cause, ())))
    if cause in TASK_CAUSES:  # the Task, not the factors, is wrong: no other method computes it right
        return rungs
    return rungs + tuple(r for r in STRATEGY_FALLBACK if r not in rungs)


TASK_CAUSES = frozenset({"loss-not-summed"})
"""Causes in the user's Task that a rung can fix (by wrapping the Task), before any factor."""
