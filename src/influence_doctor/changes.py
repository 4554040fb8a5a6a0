"""One vocabulary of changes, `kind:argument`, for experiments and remedies alike.

An experiment of the diagnosis changes one setting to test a cause; a rung of a ladder is the same
change, kept. Each kind has one planner: a pure function from (change, what it acts on, the current
settings) to a `Change` — new FactorArguments / ScoreArguments, and where it touches the factors, a
diagonal shift of the covariances or a per-module damping. A change that cannot act (nothing left to
raise, a shift that cannot reach EK-FAC's refitted Λ) plans to None with a reason, and costs no run.

Kinds: `dtype:<dtype>` raises the target's dtype group; `float64:end-to-end` is every dtype float64 and
no autocast (the precision counterfactual); `eigendecomposition-dtype:`, `covariance-dtype:`;
`shift:<ε>` / `shift-trace:<ε>` (doctored covariances); `damping:floor|floor-x100|heuristic|heuristic-x10`
(one damping for all modules) and `damping:x10` / `damping:x10-exact` (each module's own damping ×10,
the experiments' per-module counterfactual); `partitions:x2`, `offload:on`, `iterative-lambda:on`,
`batch:half`; `strategy:<name>`. A new setting is one planner in `PLANNERS`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from influence_doctor.checks.spectra import scaled_damping
from influence_doctor.dtypes import DTYPE_ORDER, GROUP_STAGE, groups_in_use, raise_group
from influence_doctor.lab import float64_settings

STRATEGY_ORDER = ("ekfac", "kfac", "diagonal", "identity")


@dataclass
class Change:
    """One change's concrete edit of the configuration, and where the pipeline must restart."""

    rung: str
    description: str
    first_stage: str
    factor_args: Any
    score_args: Any
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # "factor_args.x": (old, new)
    shift: tuple[str, float] | None = None  # ("mean" | "trace", epsilon) for doctored covariances
    batch_size: int | None = None
    module_damping: dict[str, float] | None = None  # per-module damping: experiments only (kronfluence takes one)
    summed_task: bool | None = None  # the Task's batch mean made a sum (None: the Task as it is)

    @property
    def method_changed(self) -> bool:
        """A strategy change computes another quantity than the one asked for."""
        return "factor_args.strategy" in self.changes


@dataclass(frozen=True)
class Target:
    """What a change acts on: a Problem, or a hypothesis under test."""

    stage: str
    setting: str | None = None  # the dtype group or knob ("covariance", "scores", "all", "damping", ...)
    failing_stages: frozenset[str] = frozenset()  # stages with a fail finding behind it

    @classmethod
    def of(cls, problem: Any) -> Target:
        """A Problem (or anything with stage, setting and evidence) as a target."""
        failing = frozenset(f.stage for f in getattr(problem, "evidence", ()) if f.severity == "fail")
        return cls(problem.stage, getattr(problem, "setting", None), failing)


@dataclass
class Settings:
    """What a change reads besides its target: the current arguments and what was measured with them."""

    factor_args: Any
    score_args: Any
    batch_size: int
    score_stage: str
    heuristic_damping: float | None = None  # largest over modules of kronfluence's 0.1·mean(spectrum)
    damping_floor: float | None = None  # largest over modules of eps(precondition dtype)·λmax
    artifacts: dict[str, Any] = field(default_factory=dict)  # factors measured with these settings
    module_damping: dict[str, float] | None = None  # a per-module damping already in force (experiments)
    summed_task: bool = False  # whether the Task is already made a sum


def plan(change_id: str, target: Any, settings: Settings) -> tuple[Change | None, str]:
    """The Change `change_id` makes for `target` (a Target, or a Problem), or (None, why it does not apply)."""
    kind, _, argument = change_id.partition(":")
    planner = PLANNERS.get(kind)
    if planner is None:
        return None, f"unknown change kind {kind!r}"
    target = target if isinstance(target, Target) else Target.of(target)
    fa, sa = copy.deepcopy(settings.factor_args), copy.deepcopy(settings.score_args)
    return planner(change_id, argument, target, settings, fa, sa)


def _dtype(rung, argument, on, settings, fa, sa):
    """Raise the target's dtype group (or, for a target without one, every group feeding its stage)."""
    dtype = getattr(torch, argument)
    stage = "pairwise_scores" if on.stage == "scores" else on.stage
    if on.setting == "all":  # the loss is spread over stages: every dtype on the way to the scores
        stage = settings.score_stage
    groups = [on.setting] if on.setting in GROUP_STAGE else list(groups_in_use(fa, stage))
    changes: dict[str, tuple[Any, Any]] = {}
    for group in groups:
        fa, sa, changed = raise_group(fa, sa, group, dtype)
        changes.update(changed)
    if not changes:
        return None, f"nothing in {', '.join(groups) or on.stage} is below {argument}"
    stored = ("factor_args.activation_covariance_dtype", "factor_args.gradient_covariance_dtype")
    if dtype == torch.bfloat16 and any(key in changes for key in stored) and fa.strategy in ("ekfac", "kfac"):
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


def _eigendecomposition_dtype(rung, argument, on, settings, fa, sa):
    dtype = getattr(torch, argument)
    current = fa.eigendecomposition_dtype
    if DTYPE_ORDER.get(current, 3) >= DTYPE_ORDER[dtype]:
        return None, f"eigendecomposition_dtype is already {_name(current)}"
    fa.eigendecomposition_dtype = dtype
    return _change(rung, {"factor_args.eigendecomposition_dtype": (current, dtype)}, "eigendecomposition", fa, sa), ""


def _covariance_dtype(rung, argument, on, settings, fa, sa):
    dtype = getattr(torch, argument)
    changes = {}
    for name in ("activation_covariance_dtype", "gradient_covariance_dtype"):
        current = getattr(fa, name)
        if DTYPE_ORDER.get(current, 3) < DTYPE_ORDER[dtype]:
            setattr(fa, name, dtype)
            changes[f"factor_args.{name}"] = (current, dtype)
    if not changes:
        return None, f"the covariance dtypes are already {argument} or finer"
    return _change(rung, changes, "covariance", fa, sa), ""


def _shift(rung, argument, on, settings, fa, sa):
    if fa.strategy not in ("kfac", "ekfac"):
        return None, f"strategy {fa.strategy!r} has no covariance to shift"
    reaches = fa.strategy == "kfac" or bool(on.failing_stages & {"covariance", "eigendecomposition"})
    if not reaches:
        return None, "EK-FAC refits Λ from gradients: a covariance shift cannot reach the failing spectrum"
    mode = "trace" if rung.startswith("shift-trace") else "mean"
    epsilon = float(argument)
    what = f"{epsilon:g}·trace(C)" if mode == "trace" else f"{epsilon:g}·mean(diag C)"
    change = _change(rung, {"covariance.diagonal_shift": (0.0, what)}, "eigendecomposition", fa, sa)
    change.shift = (mode, epsilon)
    change.description = f"add {what} to every covariance's diagonal (doctored copy)"
    return change, ""


def _damping(rung, argument, on, settings, fa, sa):
    """Damping rungs, smallest first; they are only ever climbed for a confirmed `tiny-damping`. `x10` and
    `x10-exact` scale each module's own damping (the experiments' counterfactual; see `_module_damping`)."""
    if argument in ("x10", "x10-exact"):
        return _module_damping(rung, argument, on, settings, fa, sa)
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
        value = scale * base
        if current is not None and current >= value:
            return None, f"damping_factor {current:g} is already at least {value:g}"
        sa.damping_factor = value
    changes = {"score_args.damping_factor": (current, sa.damping_factor)}
    return _change(rung, changes, settings.score_stage, fa, sa), ""


def _module_damping(rung, argument, on, settings, fa, sa):
    """Each module's own damping ×10 (kronfluence's heuristic or the explicit value, per module). `x10`
    starts from at least each module's rounding floor eps·λmax — a damping below rounding damps nothing,
    and ten times nothing is still nothing; `x10-exact` only lifts a damping of exactly 0 to its floor."""
    if settings.module_damping is not None:
        damping = {module: 10.0 * value for module, value in settings.module_damping.items()}
    else:
        damping = scaled_damping(
            settings.artifacts, fa.strategy, sa.damping_factor, 10.0, sa.precondition_dtype, argument == "x10"
        )
    if not damping:
        return None, "no spectrum measured to scale each module's damping from"
    floor = " (from at least its rounding floor eps·λmax)" if argument == "x10" else ""
    changes = {"score_args.damping_factor": (sa.damping_factor, "×10 per module")}
    change = _change(rung, changes, settings.score_stage, fa, sa)
    change.description = f"each module's damping ×10{floor}"
    change.module_damping = damping
    return change, ""


def _float64(rung, argument, on, settings, fa, sa):
    """The precision counterfactual: every kronfluence dtype float64 and no autocast, same damping."""
    fa, sa = float64_settings(fa, sa)
    changes = {"factor_args.*_dtype": ("as configured", torch.float64)}
    change = _change(rung, changes, "covariance", fa, sa)
    change.description = "every dtype float64 and no autocast, same damping"
    return change, ""


def _partitions(rung, argument, on, settings, fa, sa):
    changes = {}
    for holder_name, holder, names in (
        ("factor_args", fa, ("covariance_module_partitions", "lambda_module_partitions")),
        ("score_args", sa, ("module_partitions",)),
    ):
        for name in names:
            old = getattr(holder, name)
            setattr(holder, name, old * 2)
            changes[f"{holder_name}.{name}"] = (old, old * 2)
    return _change(rung, changes, on.stage, fa, sa), ""


def _flag(names: tuple[tuple[str, str], ...]):
    def planner(rung, argument, on, settings, fa, sa):
        changes = {}
        for holder_name, name in names:
            holder = fa if holder_name == "factor_args" else sa
            if hasattr(holder, name) and not getattr(holder, name):
                setattr(holder, name, True)
                changes[f"{holder_name}.{name}"] = (False, True)
        if not changes:
            return None, "already on"
        return _change(rung, changes, on.stage, fa, sa), ""

    return planner


def _batch(rung, argument, on, settings, fa, sa):
    if settings.batch_size <= 1:
        return None, "the batch size is already 1"
    change = _change(rung, {"batch_size": (settings.batch_size, settings.batch_size // 2)}, on.stage, fa, sa)
    change.batch_size = settings.batch_size // 2
    return change, ""


def _task(rung, argument, on, settings, fa, sa):
    """`task:sum`: each batch's loss and measurement × the batch's size, for a Task whose loss is a batch
    mean — exact, since a mean times its count is the sum kronfluence needs."""
    if argument != "sum":
        return None, f"unknown task change {argument!r}"
    if settings.summed_task:
        return None, "the Task is already made a sum"
    change = _change(rung, {"task.loss": ("batch mean", "× batch size")}, "covariance", fa, sa)
    change.summed_task = True
    change.description = "each batch's loss and measurement × its size (the Task's mean made a sum)"
    return change, ""


def _strategy(rung, argument, on, settings, fa, sa):
    current = fa.strategy
    if STRATEGY_ORDER.index(argument) <= STRATEGY_ORDER.index(current):
        return None, f"strategy {current!r} is already at or below {argument!r}"
    fa.strategy = argument
    change = _change(rung, {"factor_args.strategy": (current, argument)}, "covariance", fa, sa)
    change.description += f" (a different method: the scores approximate another quantity than {current}'s)"
    return change, ""


PLANNERS = {
    "dtype": _dtype,
    "float64": _float64,
    "eigendecomposition-dtype": _eigendecomposition_dtype,
    "covariance-dtype": _covariance_dtype,
    "shift": _shift,
    "shift-trace": _shift,
    "damping": _damping,
    "partitions": _partitions,
    "offload": _flag((("factor_args", "offload_activations_to_cpu"), ("score_args", "offload_activations_to_cpu"))),
    "iterative-lambda": _flag((("factor_args", "use_iterative_lambda_aggregation"),)),
    "batch": _batch,
    "task": _task,
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
