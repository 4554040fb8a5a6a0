"""One vocabulary of changes, `kind:argument`, for experiments, rungs and the float64 reference alike.

A change is a pure function from a Configuration to another, with the first stage it invalidates: an
experiment of the diagnosis changes one setting to test a cause, a rung of a ladder is the same change
kept, and the reference every fix is measured against is the change `float64:end-to-end`. Each kind has
one planner: (argument, what it acts on, the configuration, what was measured with it) → the new
configuration and what it changed, or None with the reason it cannot act (nothing left to raise, a
shift that cannot reach EK-FAC's refitted Λ), which costs no run. Nothing else makes a configuration.

Kinds: `dtype:<dtype>` raises the target's dtype group; `float64:end-to-end` is every dtype float64 and
no autocast (the precision counterfactual); `eigendecomposition-dtype:`, `covariance-dtype:`;
`shift:<ε>` / `shift-trace:<ε>` (doctored covariances); `damping:floor|floor-x100|heuristic|heuristic-x10`
(one damping for all modules) and `damping:x10` / `damping:x10-exact` (each module's own damping ×10,
the experiments' per-module counterfactual); `partitions:x2`, `offload:on`, `iterative-lambda:on`,
`batch:half`, `batch:three-quarters`; `low-rank:off`; `task:sum`; `track:<module>,<module>`;
`shared:true` (kronfluence's `has_shared_parameters`); `checkpoint:non-reentrant`; `strategy:<name>`;
`sampling-seed:<n>` (the true Fisher's targets drawn from another seed: the noise measurement only);
`set:<field>=<value>` (one setting, e.g. `set:score_args.data_partitions=4`, for the memory advice).
A new setting is one planner in `PLANNERS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from influence_doctor.causes import FLOAT64
from influence_doctor.checks.spectra import damping_reference_points, scaled_damping
from influence_doctor.configuration import Arguments, Configuration
from influence_doctor.dtypes import DTYPE_GROUPS, DTYPE_ORDER, GROUP_STAGE, groups_in_use, is_below

STRATEGY_ORDER = ("ekfac", "kfac", "diagonal", "identity")

__all__ = ["FLOAT64", "PLANNERS", "Change", "Facts", "Target", "apply", "plan", "shift_description"]

FLOAT64_FACTOR_FIELDS = (
    "activation_covariance_dtype",
    "gradient_covariance_dtype",
    "eigendecomposition_dtype",
    "per_sample_gradient_dtype",
    "lambda_dtype",
)
FLOAT64_SCORE_FIELDS = ("per_sample_gradient_dtype", "precondition_dtype", "score_dtype")


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


@dataclass(frozen=True)
class Facts:
    """What a change reads besides the configuration: measured with it (the spectra of its factors)."""

    kinds: tuple[str, ...] = ("pairwise", "self")  # the score kinds the pipeline computes
    heuristic_damping: float | None = None  # largest over modules of kronfluence's 0.1·mean(spectrum)
    damping_floor: float | None = None  # largest over modules of eps(precondition dtype)·λmax
    artifacts: Mapping[str, Any] = field(default_factory=dict, compare=False)  # the factors measured

    @classmethod
    def measured(cls, configuration: Configuration, artifacts: Mapping[str, Any], kinds: tuple[str, ...]) -> Facts:
        fa, sa = configuration.factor_args, configuration.score_args
        heuristic, floor = damping_reference_points(artifacts, fa.strategy, sa.precondition_dtype)
        return cls(tuple(kinds), heuristic, floor, artifacts)

    @property
    def score_stage(self) -> str:
        """The first score stage the pipeline computes: where a change of the score settings starts."""
        return "pairwise_scores" if "pairwise" in self.kinds else "self_scores"


@dataclass(frozen=True)
class Change:
    """One change of one configuration: the configuration it makes, what it changed, where it restarts."""

    rung: str
    description: str
    before: Configuration
    after: Configuration
    changes: dict[str, tuple[Any, Any]]  # "factor_args.x": (old, new), as the report lists them
    first_stage: str  # the earliest stage whose settings it changes: everything from there is recomputed

    @property
    def method_changed(self) -> bool:
        """A strategy change computes another quantity than the one asked for."""
        return "factor_args.strategy" in self.changes

    # what it changed, as a reader of the configuration sees it
    @property
    def factor_args(self) -> Arguments:
        return self.after.factor_args

    @property
    def score_args(self) -> Arguments:
        return self.after.score_args

    @property
    def batch_size(self) -> int | None:
        return self.after.batch_size if self.after.batch_size != self.before.batch_size else None

    @property
    def shift(self) -> tuple[str, float] | None:
        return self.after.shift if self.after.shift != self.before.shift else None

    @property
    def module_damping(self) -> dict[str, float] | None:
        return self.after.damping if self.after.module_damping != self.before.module_damping else None

    @property
    def summed_task(self) -> bool | None:
        return self.after.summed_task if self.after.task != self.before.task else None


Planner = Callable[[str, str, Target, Configuration, Facts], "tuple[Change | None, str]"]


def plan(
    change_id: str, target: Any, configuration: Configuration, facts: Facts | None = None
) -> tuple[Change | None, str]:
    """The Change `change_id` makes to `configuration` for `target` (a Target, or a Problem), or
    (None, why it does not apply)."""
    kind, _, argument = change_id.partition(":")
    planner = PLANNERS.get(kind)
    if planner is None:
        return None, f"unknown change kind {kind!r}"
    target = target if isinstance(target, Target) else Target.of(target)
    return planner(change_id, argument, target, configuration, facts or Facts())


def apply(
    change_id: str, configuration: Configuration, facts: Facts | None = None, target: Any = None
) -> Configuration:
    """The configuration `change_id` makes, for changes that need no target (a reference, an option off)."""
    change, why = plan(change_id, target or Target("covariance"), configuration, facts)
    if change is None:
        raise ValueError(f"{change_id} cannot act on this configuration: {why}")
    return change.after


def raise_group(
    factor_args: Any, score_args: Any, group: str, target: torch.dtype
) -> tuple[Any, Any, dict[str, tuple[Any, Any]]]:
    """The arguments (immutable `configuration.Arguments`) with `group`'s dtypes raised to at least
    `target`, and what changed. Autocast is raised by switching it off (full precision) unless the target
    is bfloat16."""
    holder_name, fields = DTYPE_GROUPS[group]
    holder = factor_args if holder_name == "factor_args" else score_args
    changes: dict[str, tuple[Any, Any]] = {}
    for name in fields:
        current = getattr(holder, name)
        if not is_below(current, target, group):
            continue
        new = (target if target == torch.bfloat16 else None) if name == "amp_dtype" else target
        changes[f"{holder_name}.{name}"] = (current, new)
    raised = holder.replace(**{key.split(".", 1)[1]: new for key, (_old, new) in changes.items()})
    return (raised, score_args, changes) if holder_name == "factor_args" else (factor_args, raised, changes)


def _make(
    rung: str,
    changes: dict[str, tuple[Any, Any]],
    before: Configuration,
    after: Configuration,
    facts: Facts,
    description: str | None = None,
) -> tuple[Change, str]:
    description = description or ", ".join(
        f"{key.split('.', 1)[-1]} {_name(old)} → {_name(new)}" for key, (old, new) in changes.items()
    )
    first = after.first_difference(before, facts.kinds) or facts.score_stage
    return Change(rung, description, before, after, changes, first), ""


def _arguments(configuration: Configuration, factor_args: Arguments, score_args: Arguments) -> Configuration:
    return configuration.with_(factor_args=factor_args, score_args=score_args)


def _dtype(rung, argument, on, configuration, facts):
    """Raise the target's dtype group (or, for a target without one, every group feeding its stage)."""
    dtype = getattr(torch, argument)
    fa, sa = configuration.factor_args, configuration.score_args
    stage = "pairwise_scores" if on.stage == "scores" else on.stage
    if on.setting == "all":  # the loss is spread over stages: every dtype on the way to the scores
        stage = facts.score_stage
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
    return _make(rung, changes, configuration, _arguments(configuration, fa, sa), facts)


def _eigendecomposition_dtype(rung, argument, on, configuration, facts):
    dtype = getattr(torch, argument)
    fa = configuration.factor_args
    current = fa.eigendecomposition_dtype
    if DTYPE_ORDER.get(current, 3) >= DTYPE_ORDER[dtype]:
        return None, f"eigendecomposition_dtype is already {_name(current)}"
    after = configuration.with_(factor_args=fa.replace(eigendecomposition_dtype=dtype))
    return _make(rung, {"factor_args.eigendecomposition_dtype": (current, dtype)}, configuration, after, facts)


def _covariance_dtype(rung, argument, on, configuration, facts):
    dtype = getattr(torch, argument)
    fa = configuration.factor_args
    changes = {}
    for name in ("activation_covariance_dtype", "gradient_covariance_dtype"):
        current = getattr(fa, name)
        if DTYPE_ORDER.get(current, 3) < DTYPE_ORDER[dtype]:
            changes[f"factor_args.{name}"] = (current, dtype)
    if not changes:
        return None, f"the covariance dtypes are already {argument} or finer"
    after = configuration.with_(factor_args=fa.replace(**{k.split(".", 1)[1]: new for k, (_, new) in changes.items()}))
    return _make(rung, changes, configuration, after, facts)


def _shift(rung, argument, on, configuration, facts):
    strategy = configuration.factor_args.strategy
    if strategy not in ("kfac", "ekfac"):
        return None, f"strategy {strategy!r} has no covariance to shift"
    reaches = strategy == "kfac" or bool(on.failing_stages & {"covariance", "eigendecomposition"})
    if not reaches:
        return None, "EK-FAC refits Λ from gradients: a covariance shift cannot reach the failing spectrum"
    shift = ("trace" if rung.startswith("shift-trace") else "mean", float(argument))
    changes = {"covariance.diagonal_shift": (0.0, _shift_amount(shift))}
    return _make(rung, changes, configuration, configuration.with_(shift=shift), facts, shift_description(shift))


def _shift_amount(shift: tuple[str, float]) -> str:
    mode, epsilon = shift
    return f"{epsilon:g}·trace(C)" if mode == "trace" else f"{epsilon:g}·mean(diag C)"


def shift_description(shift: tuple[str, float]) -> str:
    """A diagonal shift of the covariances, as a person reads it."""
    return f"add {_shift_amount(shift)} to every covariance's diagonal (doctored copy)"


def _damping(rung, argument, on, configuration, facts):
    """Damping rungs, smallest first; they are only ever climbed for a confirmed `tiny-damping`. `x10` and
    `x10-exact` scale each module's own damping (the experiments' counterfactual; see `_module_damping`)."""
    if argument in ("x10", "x10-exact"):
        return _module_damping(rung, argument, on, configuration, facts)
    sa = configuration.score_args
    current = sa.damping_factor
    if argument == "heuristic":
        if current is None:
            return None, "damping is already kronfluence's heuristic"
        value = None
    else:
        base, scale = {
            "floor": (facts.damping_floor, 1.0),
            "floor-x100": (facts.damping_floor, 100.0),
            "heuristic-x10": (facts.heuristic_damping, 10.0),
        }.get(argument, (None, 1.0))
        if base is None or not math.isfinite(base) or base <= 0:
            return None, f"no finite {argument.split('-')[0]} damping to derive it from"
        value = scale * base
        if current is not None and current >= value:
            return None, f"damping_factor {current:g} is already at least {value:g}"
    after = configuration.with_(score_args=sa.replace(damping_factor=value))
    return _make(rung, {"score_args.damping_factor": (current, value)}, configuration, after, facts)


def _module_damping(rung, argument, on, configuration, facts):
    """Each module's own damping ×10 (kronfluence's heuristic or the explicit value, per module). `x10`
    starts from at least each module's rounding floor eps·λmax — a damping below rounding damps nothing,
    and ten times nothing is still nothing; `x10-exact` only lifts a damping of exactly 0 to its floor."""
    sa = configuration.score_args
    if configuration.module_damping is not None:
        damping = {module: 10.0 * value for module, value in configuration.module_damping}
    else:
        damping = scaled_damping(
            facts.artifacts,
            configuration.factor_args.strategy,
            sa.damping_factor,
            10.0,
            sa.precondition_dtype,
            argument == "x10",
        )
    if not damping:
        return None, "no spectrum measured to scale each module's damping from"
    floor = " (from at least its rounding floor eps·λmax)" if argument == "x10" else ""
    after = configuration.with_(module_damping=tuple(sorted(damping.items())))
    changes = {"score_args.damping_factor": (sa.damping_factor, "×10 per module")}
    return _make(rung, changes, configuration, after, facts, f"each module's damping ×10{floor}")


def _float64(rung, argument, on, configuration, facts):
    """The precision counterfactual: every kronfluence dtype float64 and no autocast, same damping."""
    fa = configuration.factor_args.replace(**dict.fromkeys(FLOAT64_FACTOR_FIELDS, torch.float64), amp_dtype=None)
    sa = configuration.score_args.replace(**dict.fromkeys(FLOAT64_SCORE_FIELDS, torch.float64), amp_dtype=None)
    changes = {"factor_args.*_dtype": ("as configured", torch.float64)}
    description = "every dtype float64 and no autocast, same damping"
    return _make(rung, changes, configuration, _arguments(configuration, fa, sa), facts, description)


def _partitions(rung, argument, on, configuration, facts):
    fa, sa = configuration.factor_args, configuration.score_args
    changes = {}
    for holder_name, holder, names in (
        ("factor_args", fa, ("covariance_module_partitions", "lambda_module_partitions")),
        ("score_args", sa, ("module_partitions",)),
    ):
        for name in names:
            old = getattr(holder, name)
            changes[f"{holder_name}.{name}"] = (old, old * 2)
    return _make(rung, changes, configuration, _edited(configuration, changes), facts)


def _flag(names: tuple[tuple[str, str], ...]) -> Planner:
    def planner(rung, argument, on, configuration, facts):
        changes = {}
        for holder_name, name in names:
            holder = getattr(configuration, holder_name)
            if not getattr(holder, name, True):
                changes[f"{holder_name}.{name}"] = (False, True)
        if not changes:
            return None, "already on"
        return _make(rung, changes, configuration, _edited(configuration, changes), facts)

    return planner


def _batch(rung, argument, on, configuration, facts):
    """`batch:half` (the memory rung) and `batch:three-quarters` (a correct Task ranks alike at any batch
    size: the probe of a Task that is not a sum)."""
    size = configuration.batch_size
    new = {"half": size // 2, "three-quarters": max(1, (3 * size) // 4)}.get(argument)
    if new is None:
        return None, f"unknown batch change {argument!r}"
    if new < 1 or new == size:
        return None, f"the batch size is already {size}"
    return _make(rung, {"batch_size": (size, new)}, configuration, configuration.with_(batch_size=new), facts)


def _low_rank(rung, argument, on, configuration, facts):
    """`low-rank:off`: full-rank query gradients, the reference of `query_gradient_low_rank`'s cost."""
    current = configuration.score_args.query_gradient_low_rank
    if argument != "off" or current is None:
        return None, "the query gradients are already full rank" if current is None else f"unknown {argument!r}"
    changes = {"score_args.query_gradient_low_rank": (current, None)}
    return _make(rung, changes, configuration, _edited(configuration, changes), facts, "full-rank query gradients")


def _task(rung, argument, on, configuration, facts):
    """`task:sum`: each batch's loss and measurement × the batch's size, for a Task whose loss is a batch
    mean — exact, since a mean times its count is the sum kronfluence needs."""
    if argument != "sum":
        return None, f"unknown task change {argument!r}"
    if configuration.summed_task:
        return None, "the Task is already made a sum"
    description = "each batch's loss and measurement × its size (the Task's mean made a sum)"
    changes = {"task.loss": ("batch mean", "× batch size")}
    return _make(rung, changes, configuration, configuration.with_(task="summed"), facts, description)


def _track(rung, argument, on, configuration, facts):
    """`track:<module>,<module>,...`: kronfluence tracks these modules only (the Task's own choice is
    replaced): what the scores then describe changes, so it is a coverage change, never a repair."""
    modules = tuple(sorted({name.strip() for name in argument.split(",") if name.strip()}))
    if not modules:
        return None, "no module named to track"
    if modules == configuration.tracked_modules:
        return None, "these modules are already the ones tracked"
    changes = {"task.tracked_modules": (configuration.tracked_modules, modules)}
    description = f"track {len(modules)} module(s): {', '.join(modules)} (a coverage change)"
    return _make(rung, changes, configuration, configuration.with_(tracked_modules=modules), facts, description)


def _checkpoint(rung, argument, on, configuration, facts):
    """`checkpoint:non-reentrant`: every activation checkpoint of the model runs non-reentrant under
    kronfluence, which computes the same numbers and lets its hooks see the recomputed forward."""
    if argument != "non-reentrant":
        return None, f"unknown checkpoint change {argument!r}"
    if configuration.recompute == "non-reentrant":
        return None, "the checkpoints are already non-reentrant"
    changes = {"model.checkpointing": ("reentrant", "non-reentrant")}
    description = "every torch.utils.checkpoint call non-reentrant (the same numbers, a forward the hooks see)"
    return _make(rung, changes, configuration, configuration.with_(recompute="non-reentrant"), facts, description)


def _sampling_seed(rung, argument, on, configuration, facts):
    """`sampling-seed:<n>`: the true Fisher's sampled targets drawn independently (only the measurement of
    the rankings' Monte-Carlo noise compares two seeds; every other comparison holds one)."""
    if not argument.isdigit():
        return None, f"a sampling seed is a non-negative integer, not {argument!r}"
    seed = int(argument)
    if configuration.factor_args.use_empirical_fisher:
        return None, "the empirical Fisher samples no targets"
    if seed == configuration.sampling_seed:
        return None, f"the targets are already drawn with sampling seed {seed}"
    changes = {"sampling_seed": (configuration.sampling_seed, seed)}
    description = f"the true Fisher's targets drawn with sampling seed {seed}"
    return _make(rung, changes, configuration, configuration.with_(sampling_seed=seed), facts, description)


def _strategy(rung, argument, on, configuration, facts):
    current = configuration.factor_args.strategy
    if STRATEGY_ORDER.index(argument) <= STRATEGY_ORDER.index(current):
        return None, f"strategy {current!r} is already at or below {argument!r}"
    changes = {"factor_args.strategy": (current, argument)}
    change, _ = _make(rung, changes, configuration, _edited(configuration, changes), facts)
    description = f"{change.description} (a different method: the scores approximate another quantity than {current}'s)"
    return Change(rung, description, change.before, change.after, change.changes, change.first_stage), ""


def _set(rung, argument, on, configuration, facts):
    """`set:<holder>.<field>=<value>` (or `set:batch_size=<n>`): one setting given outright."""
    name, _, text = argument.partition("=")
    value: Any = None if text == "None" else int(text) if text.lstrip("-").isdigit() else text
    if name == "batch_size":
        old = configuration.batch_size
        return _make(rung, {name: (old, value)}, configuration, configuration.with_(batch_size=value), facts)
    holder_name, _, field_name = name.partition(".")
    holder = getattr(configuration, holder_name, None)
    if holder_name not in ("factor_args", "score_args") or not hasattr(holder, field_name):
        return None, f"no setting {name!r}"
    old = getattr(holder, field_name)
    if isinstance(old, bool):
        value = text == "True"
    return _make(rung, {name: (old, value)}, configuration, _edited(configuration, {name: (old, value)}), facts)


def _edited(configuration: Configuration, changes: Mapping[str, tuple[Any, Any]]) -> Configuration:
    """The configuration with the arguments' fields named "factor_args.x" / "score_args.y" set to new values."""
    edits: dict[str, dict[str, Any]] = {"factor_args": {}, "score_args": {}}
    for key, (_old, new) in changes.items():
        holder, _, name = key.partition(".")
        edits[holder][name] = new
    return _arguments(
        configuration,
        configuration.factor_args.replace(**edits["factor_args"]),
        configuration.score_args.replace(**edits["score_args"]),
    )


PLANNERS: dict[str, Planner] = {
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
    "low-rank": _low_rank,
    "task": _task,
    "track": _track,
    "shared": _flag((("factor_args", "has_shared_parameters"),)),
    "checkpoint": _checkpoint,
    "sampling-seed": _sampling_seed,
    "strategy": _strategy,
    "set": _set,
}


def _name(value: Any) -> str:
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return "None" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
