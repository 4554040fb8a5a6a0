"""The run is a trial: one frozen Configuration describes everything an experiment or a rung can change.

kronfluence's own argument objects are mutable (and kronfluence itself switches options off in the ones it
is given), so a Configuration holds them as immutable values (`Arguments`) and builds a fresh kronfluence
object for every call. A Configuration is hashable: its `key` names a trial in the executor's cache, and
the key of each stage (`stage_key`) covers exactly the settings that stage and the stages before it
read, so two configurations share every stage before the first one they differ in. Only the changes of
`changes.py` make a Configuration from another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from typing import Any

from influence_doctor.pipeline import STAGES

EIGENDECOMPOSITION_FIELDS = frozenset({"eigendecomposition_dtype"})
"""FactorArguments fields the eigendecomposition reads beyond what the covariance read."""
LAMBDA_FIELDS = frozenset(
    {
        "lambda_max_examples",
        "lambda_data_partitions",
        "lambda_module_partitions",
        "use_iterative_lambda_aggregation",
        "offload_activations_to_cpu",
        "per_sample_gradient_dtype",
        "lambda_dtype",
    }
)
"""FactorArguments fields only the lambda stage reads; every other field counts as the covariance's (a
field kronfluence adds later is then conservatively one that invalidates everything)."""

RECOMPUTE_FORMS = ("as given", "non-reentrant")
"""How the model's activation checkpointing runs under kronfluence: as the model does it, or every
`torch.utils.checkpoint` call made non-reentrant (kronfluence's hooks cannot register on the outputs of
a reentrant checkpoint's first, gradient-free pass; the non-reentrant one computes the same numbers)."""

TASK_FORMS = ("as given", "summed")
"""How the user's Task is handed to kronfluence: as written, or with each batch's loss and measurement
multiplied by the batch's size (a batch mean made the sum kronfluence needs: the `task:sum` rung)."""


@dataclass(frozen=True)
class Arguments:
    """kronfluence's FactorArguments or ScoreArguments as an immutable, hashable value.

    Fields read as attributes (`arguments.strategy`); `build()` makes the kronfluence object a call needs."""

    kind: type
    values: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, arguments: Any) -> Arguments:
        if isinstance(arguments, Arguments):
            return arguments
        return cls(type(arguments), tuple((f.name, getattr(arguments, f.name)) for f in fields(arguments)))

    def __post_init__(self) -> None:
        for key, value in self.values:  # plain attributes: reading one is a lookup, not a call
            object.__setattr__(self, key, value)

    def __getattr__(self, name: str) -> Any:  # only reached for a name that is not a field
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{object.__getattribute__(self, 'kind').__name__} has no field {name!r}")

    def replace(self, **changes: Any) -> Arguments:
        """The same arguments with some fields changed (for `changes.py`)."""
        unknown = set(changes) - {key for key, _value in self.values}
        if unknown:
            raise ValueError(f"{self.kind.__name__} has no field {sorted(unknown)[0]!r}")
        return Arguments(self.kind, tuple((key, changes.get(key, value)) for key, value in self.values))

    def build(self) -> Any:
        """A fresh kronfluence object: whatever kronfluence does to it, this value stays as it was."""
        return self.kind(**dict(self.values))

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def to_dict(self) -> dict[str, Any]:
        """As kronfluence's own `to_dict`: dtypes as their names (`torch.float32`)."""
        import torch

        return {key: str(value) if isinstance(value, torch.dtype) else value for key, value in self.values}


@dataclass(frozen=True)
class Configuration:
    """Everything that can differ between two trials of one pipeline."""

    factor_args: Arguments
    score_args: Arguments
    batch_size: int  # per-device batch size of the factor stages and of the training examples' gradients
    query_batch_size: int
    task: str = "as given"  # one of TASK_FORMS
    shift: tuple[str, float] | None = None  # ("mean" | "trace", ε): a diagonal shift added to every covariance
    module_damping: tuple[tuple[str, float], ...] | None = None  # per-module damping (experiments only)
    tracked_modules: tuple[str, ...] | None = None  # the modules kronfluence tracks (None: the Task's own choice)
    recompute: str = "as given"  # the model's activation checkpointing: one of RECOMPUTE_FORMS
    sampling_seed: int = 0  # the true Fisher's sampled targets: 0 the run's draw, another an independent one
    _keys: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    @classmethod
    def of(cls, pipeline: Any) -> Configuration:
        """The configuration a pipeline asks for."""
        return cls(
            Arguments.of(pipeline.factor_args),
            Arguments.of(pipeline.score_args),
            int(pipeline.batch_size),
            int(pipeline.query_batch_size),
        )

    def __post_init__(self) -> None:
        if self.task not in TASK_FORMS:
            raise ValueError(f"task must be one of {TASK_FORMS}, not {self.task!r}")
        if self.recompute not in RECOMPUTE_FORMS:
            raise ValueError(f"recompute must be one of {RECOMPUTE_FORMS}, not {self.recompute!r}")
        if self.tracked_modules is not None and not self.tracked_modules:
            raise ValueError("tracked_modules names at least one module (None: the Task's own choice)")

    @property
    def summed_task(self) -> bool:
        return self.task == "summed"

    @property
    def damping(self) -> dict[str, float] | None:
        """The per-module damping an experiment set, or None (kronfluence's one `damping_factor`)."""
        return dict(self.module_damping) if self.module_damping is not None else None

    def with_(self, **changes: Any) -> Configuration:
        """A new configuration with some fields changed (for `changes.py`: nothing else alters one)."""
        return replace(self, **changes)

    @property
    def key(self) -> str:
        """Names the whole configuration: equal keys, equal trials."""
        if "all" not in self._keys:
            self._keys["all"] = _digest([self._stage_settings("self_scores"), self.query_batch_size])
        return self._keys["all"]

    def stage_key(self, stage: str) -> str:
        """A short digest of the settings `stage` and every stage before it read."""
        if stage not in self._keys:
            self._keys[stage] = _digest(self._stage_settings(stage))
        return self._keys[stage]

    def _stage_settings(self, stage: str) -> Any:
        factor = self.factor_args.to_dict()
        covariance = {k: v for k, v in factor.items() if k not in EIGENDECOMPOSITION_FIELDS | LAMBDA_FIELDS}
        settings: list[Any] = [covariance, self.batch_size, self.task, self.tracked_modules, self.recompute]
        if self.sampling_seed:  # (absent at 0, so that the keys of the run's own draw stay as they were)
            settings.append({"sampling_seed": self.sampling_seed})
        if STAGES.index(stage) >= STAGES.index("eigendecomposition"):
            settings += [{k: factor[k] for k in sorted(EIGENDECOMPOSITION_FIELDS)}, self.shift]
        if STAGES.index(stage) >= STAGES.index("lambda"):
            settings.append({k: factor[k] for k in sorted(LAMBDA_FIELDS)})
        if stage in ("pairwise_scores", "self_scores"):
            settings += [self.score_args.to_dict(), self.module_damping]
        if stage == "pairwise_scores":
            settings.append(self.query_batch_size)
        return settings

    def first_difference(self, other: Configuration, kinds: tuple[str, ...] = ("pairwise", "self")) -> str | None:
        """The earliest influence stage computing `kinds` of scores whose settings differ between the two
        (None: they compute the same)."""
        stages = ["covariance", "eigendecomposition", "lambda"] + [f"{kind}_scores" for kind in kinds]
        return next((s for s in stages if self.stage_key(s) != other.stage_key(s)), None)


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
