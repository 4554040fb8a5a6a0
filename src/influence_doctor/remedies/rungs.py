"""What each rung changes: a pure function from (rung, problem, current settings) to a Change.

A rung that cannot act on the problem (nothing left to raise, a shift that cannot reach EK-FAC's
refitted Λ) plans to None with a reason, and the ladder moves on without spending a re-run.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from influence_doctor.diagnosis import Problem
from influence_doctor.dtypes import DTYPE_ORDER, GROUP_STAGE, groups_in_use, raise_group

STRATEGY_ORDER = ("ekfac", "kfac", "diagonal", "identity")


@dataclass
class Change:
    """One rung's concrete edit of the configuration, and where the pipeline must restart."""

    rung: str
    description: str
    first_stage: str
    factor_args: Any
    score_args: Any
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # "factor_args.x": (old, new)
    shift: tuple[str, float] | None = None  # ("mean" | "trace", epsilon) for doctored covariances
    batch_size: int | None = None


@dataclass
class Settings:
    """What a rung reads besides the problem: the current arguments and what the run measured."""

    factor_args: Any
    score_args: Any
    batch_size: int
    score_stage: str
    heuristic_damping: float | None = None  # largest over modules of kronfluence's 0.1·mean(spectrum)
    damping_floor: float | None = None  # largest over modules of eps(precondition dtype)·λmax


def plan(rung: str, problem: Problem, settings: Settings) -> tuple[Change | None, str]:
    """The Change `rung` makes for `problem`, or (None, why it does not apply)."""
    kind, _, argument = rung.partition(":")
    planner = _PLANNERS.get(kind)
    if planner is None:
        return None, f"unknown rung kind {kind!r}"
    fa, sa = copy.deepcopy(settings.factor_args), copy.deepcopy(settings.score_args)
    return planner(rung, argument, problem, settings, fa, sa)


def _dtype(rung, argument, problem, settings, fa, sa):
    """Raise the problem's dtype group (or, for a problem without one, every group feeding its stage)."""
    target = getattr(torch, argument)
    stage = "pairwise_scores" if problem.stage == "scores" else problem.stage
    if problem.setting == "all":  # the loss is spread over stages: every dtype on the way to the scores
        stage = settings.score_stage
    groups = [problem.setting] if problem.setting in GROUP_STAGE else list(groups_in_use(fa, stage))
    changes: dict[str, tuple[Any, Any]] = {}
    for group in groups:
        fa, sa, changed = raise_group(fa, sa, group, target)
        changes.update(changed)
    if not changes:
        return None, f"nothing in {', '.join(groups) or problem.stage} is below {argument}"
    stored = ("factor_args.activation_covariance_dtype", "factor_args.gradient_covariance_dtype")
    if target == torch.bfloat16 and any(key in changes for key in stored) and fa.strategy in ("ekfac", "kfac"):
        return None, (
            "bfloat16 covariances store bfloat16 eigenvectors, which always leaves the eigenvector "
            "precision drifting (dtype-drift): known not to heal"
        )
    if all(key.startswith("score_args") for key in changes):
        first = settings.score_stage
    elif any("covariance" in key or "amp_dtype" in key for key in changes if key.startswith("factor_args")):
        first = "covariance"
    elif "factor_args.eigendecomposition_dtype" in changes:
        first = "eigendecomposition"
    else:
        first = "lambda"
    return _change(rung, changes, first, fa, sa), ""


def _eigendecomposition_dtype(rung, argument, problem, settings, fa, sa):
    target = getattr(torch, argument)
    current = fa.eigendecomposition_dtype
    if DTYPE_ORDER.get(current, 3) >= DTYPE_ORDER[target]:
        return None, f"eigendecomposition_dtype is already {_name(current)}"
    fa.eigendecomposition_dtype = target
    return _change(rung, {"factor_args.eigendecomposition_dtype": (current, target)}, "eigendecomposition", fa, sa), ""


def _covariance_dtype(rung, argument, problem, settings, fa, sa):
    target = getattr(torch, argument)
    changes = {}
    for name in ("activation_covariance_dtype", "gradient_covariance_dtype"):
        current = getattr(fa, name)
        if DTYPE_ORDER.get(current, 3) < DTYPE_ORDER[target]:
            setattr(fa, name, target)
            changes[f"factor_args.{name}"] = (current, target)
    if not changes:
        return None, f"the covariance dtypes are already {argument} or finer"
    return _change(rung, changes, "covariance", fa, sa), ""


def _shift(rung, argument, problem, settings, fa, sa):
    if fa.strategy not in ("kfac", "ekfac"):
        return None, f"strategy {fa.strategy!r} has no covariance to shift"
    reaches = fa.strategy == "kfac" or any(
        f.stage in ("covariance", "eigendecomposition") for f in problem.evidence if f.severity == "fail"
    )
    if not reaches:
        return None, "EK-FAC refits Λ from gradients: a covariance shift cannot reach the failing spectrum"
    mode = "trace" if rung.startswith("shift-trace") else "mean"
    epsilon = float(argument)
    what = f"{epsilon:g}·trace(C)" if mode == "trace" else f"{epsilon:g}·mean(diag C)"
    change = _change(rung, {"covariance.diagonal_shift": (0.0, what)}, "eigendecomposition", fa, sa)
    change.shift = (mode, epsilon)
    change.description = f"add {what} to every covariance's diagonal (doctored copy)"
    return change, ""


def _damping(rung, argument, problem, settings, fa, sa):
    """Damping rungs, smallest first; they are only ever climbed for a confirmed `tiny-damping`."""
    current = sa.damping_factor
    if argument == "heuristic":
        if current is None:
            return None, "damping is already kronfluence's heuristic"
        sa.damping_factor = None
    else:
        base, scale = {
            "floor": (settings.damping_floor, 1.0),
            "floor-x100": (settings.damping_floor, 100.0),
            "heuristic-x10": (settings.heuristic_damping, 10.0),
        }.get(argument, (None, 1.0))
        if base is None or not math.isfinite(base) or base <= 0:
            return None, f"no finite {argument.split('-')[0]} damping to derive it from"
        target = scale * base
        if current is not None and current >= target:
            return None, f"damping_factor {current:g} is already at least {target:g}"
        sa.damping_factor = target
    changes = {"score_args.damping_factor": (current, sa.damping_factor)}
    return _change(rung, changes, settings.score_stage, fa, sa), ""


def _partitions(rung, argument, problem, settings, fa, sa):
    changes = {}
    for holder_name, holder, names in (
        ("factor_args", fa, ("covariance_module_partitions", "lambda_module_partitions")),
        ("score_args", sa, ("module_partitions",)),
    ):
        for name in names:
            old = getattr(holder, name)
            setattr(holder, name, old * 2)
            changes[f"{holder_name}.{name}"] = (old, old * 2)
    return _change(rung, changes, problem.stage, fa, sa), ""


def _flag(names: tuple[tuple[str, str], ...]):
    def planner(rung, argument, problem, settings, fa, sa):
        changes = {}
        for holder_name, name in names:
            holder = fa if holder_name == "factor_args" else sa
            if hasattr(holder, name) and not getattr(holder, name):
                setattr(holder, name, True)
                changes[f"{holder_name}.{name}"] = (False, True)
        if not changes:
            return None, "already on"
        return _change(rung, changes, problem.stage, fa, sa), ""

    return planner


def _batch(rung, argument, problem, settings, fa, sa):
    if settings.batch_size <= 1:
        return None, "the batch size is already 1"
    change = _change(rung, {"batch_size": (settings.batch_size, settings.batch_size // 2)}, problem.stage, fa, sa)
    change.batch_size = settings.batch_size // 2
    return change, ""


def _strategy(rung, argument, problem, settings, fa, sa):
    current = fa.strategy
    if STRATEGY_ORDER.index(argument) <= STRATEGY_ORDER.index(current):
        return None, f"strategy {current!r} is already at or below {argument!r}"
    fa.strategy = argument
    change = _change(rung, {"factor_args.strategy": (current, argument)}, "covariance", fa, sa)
    change.description += f" (a different method: the scores approximate another quantity than {current}'s)"
    return change, ""


_PLANNERS = {
    "dtype": _dtype,
    "eigendecomposition-dtype": _eigendecomposition_dtype,
    "covariance-dtype": _covariance_dtype,
    "shift": _shift,
    "shift-trace": _shift,
    "damping": _damping,
    "partitions": _partitions,
    "offload": _flag((("factor_args", "offload_activations_to_cpu"), ("score_args", "offload_activations_to_cpu"))),
    "iterative-lambda": _flag((("factor_args", "use_iterative_lambda_aggregation"),)),
    "batch": _batch,
    "strategy": _strategy,
}


def _change(rung: str, changes: dict[str, tuple[Any, Any]], first: str, fa: Any, sa: Any) -> Change:
    description = ", ".join(
        f"{key.split('.', 1)[-1]} {_name(old)} → {_name(new)}" for key, (old, new) in changes.items()
    )
    return Change(rung=rung, description=description, first_stage=first, factor_args=fa, score_args=sa, changes=changes)


def _name(value: Any) -> str:
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return "None" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def damping_reference_points(artifacts: dict[str, Any], strategy: str, precondition_dtype: torch.dtype):
    """(largest heuristic damping over modules, largest rounding floor over modules): kronfluence takes
    one damping for every module, so a rung must be enough for the module that needs the most."""
    from influence_doctor.lab import module_damping, rounding_floors

    heuristic = [v for v in module_damping(artifacts, strategy, None).values() if math.isfinite(v)]
    floors = [v for v in rounding_floors(artifacts, strategy, precondition_dtype).values() if math.isfinite(v)]
    return (max(heuristic) if heuristic else None), (max(floors) if floors else None)
