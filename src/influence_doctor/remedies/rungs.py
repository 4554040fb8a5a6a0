"""What each rung changes: a pure function from (rung, problem, current settings) to a Change.

A rung that cannot act on the problem (nothing left to raise, a shift that cannot reach EK-FAC's
refitted Λ) plans to None with a reason, and the ladder moves on without spending a re-run.
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch

from influence_doctor.checks.conditioning import HEURISTIC_DAMPING_SCALE
from influence_doctor.diagnosis import Problem

DTYPE_ORDER: dict[torch.dtype, int] = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
"""Range and precision together: fp16 (narrow range) < bf16 (fp32's range, coarse) < fp32 < fp64."""

STAGE_DTYPE_FIELDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "covariance": ("factor_args", ("activation_covariance_dtype", "gradient_covariance_dtype")),
    "eigendecomposition": ("factor_args", ("activation_covariance_dtype", "gradient_covariance_dtype")),
    "lambda": ("factor_args", ("per_sample_gradient_dtype", "lambda_dtype")),
    "pairwise_scores": ("score_args", ("per_sample_gradient_dtype", "precondition_dtype", "score_dtype")),
    "self_scores": ("score_args", ("per_sample_gradient_dtype", "precondition_dtype", "score_dtype")),
}
"""Which dtype fields govern the quantity computed in each stage (eigenvectors are stored in the
covariance dtype, so eigendecomposition problems are fixed there)."""

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
    heuristic_damping: float | None = None  # median over modules of kronfluence's 0.1·mean(Λ)


def plan(rung: str, problem: Problem, settings: Settings) -> tuple[Change | None, str]:
    """The Change `rung` makes for `problem`, or (None, why it does not apply)."""
    kind, _, argument = rung.partition(":")
    planner = _PLANNERS.get(kind)
    if planner is None:
        return None, f"unknown rung kind {kind!r}"
    fa, sa = copy.deepcopy(settings.factor_args), copy.deepcopy(settings.score_args)
    return planner(rung, argument, problem, settings, fa, sa)


def _dtype(rung, argument, problem, settings, fa, sa):
    target = getattr(torch, argument)
    holder_name, fields = STAGE_DTYPE_FIELDS.get(problem.stage, STAGE_DTYPE_FIELDS["covariance"])
    holder = fa if holder_name == "factor_args" else sa
    named = [f for f in fields if any(f.removesuffix("_dtype") in subject for subject in problem.subjects)]
    changes: dict[str, tuple[Any, Any]] = {}
    for name in named or fields:
        current = getattr(holder, name)
        if DTYPE_ORDER.get(current, 3) < DTYPE_ORDER[target]:
            setattr(holder, name, target)
            changes[f"{holder_name}.{name}"] = (current, target)
    amp = holder.amp_dtype
    if amp is not None and DTYPE_ORDER.get(amp, 3) < DTYPE_ORDER[target]:
        holder.amp_dtype = target if target == torch.bfloat16 else None
        changes[f"{holder_name}.amp_dtype"] = (amp, holder.amp_dtype)
    if not changes:
        return None, f"nothing in {problem.stage} is below {argument}"
    if holder_name == "score_args":
        first = settings.score_stage
    elif any("covariance" in key or "amp_dtype" in key for key in changes):
        first = "covariance"
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
    current = sa.damping_factor
    if argument == "heuristic":
        if current is None:
            return None, "damping is already kronfluence's heuristic"
        sa.damping_factor = None
    else:
        base = settings.heuristic_damping
        if base is None or not math.isfinite(base) or base <= 0:
            return None, "no finite heuristic damping to scale"
        target = 10.0 * base
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
    return _change(rung, {"factor_args.strategy": (current, argument)}, "covariance", fa, sa), ""


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


def heuristic_damping(artifacts: dict[str, Any], strategy: str) -> float | None:
    """The median over modules of kronfluence's damping heuristic (0.1 × mean of the divided spectrum)."""
    values = []
    lambdas = artifacts.get("lambda") or {}
    if strategy in ("ekfac", "diagonal") and lambdas:
        for module, matrix in lambdas.get("lambda_matrix", {}).items():
            count = float(lambdas["num_lambda_processed"][module].sum())
            values.append(HEURISTIC_DAMPING_SCALE * float(matrix.double().mean()) / max(count, 1.0))
    eigen = artifacts.get("eigendecomposition") or {}
    if strategy == "kfac" and eigen:
        for module, act in eigen.get("activation_eigenvalues", {}).items():
            grad = eigen["gradient_eigenvalues"][module]
            values.append(HEURISTIC_DAMPING_SCALE * float(act.double().mean()) * float(grad.double().mean()))
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else None
