"""Counterfactual trials: the pipeline's influence stages re-run on a subsample with one setting changed.

Every verdict the doctor reaches rests on a trial: the configured settings against float64, a stage's
dtype raised, each module's damping ×10, a covariance shift or a remedy's rung. A `Lab` runs trials
on a fixed subsample of the rehearsal — the first `examples` training examples and the first
`queries` queries — from the same trained model, with the same seeds for every trial, so that the only
difference between two trials is the setting that was changed. Trials are cached by their settings:
factors are shared by trials that differ only in score settings.

Everything a trial writes goes into the run's own kronfluence folder, under names starting `lab-`.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Subset

from influence_doctor.checks.scores import total_scores
from influence_doctor.environment import seed_everything
from influence_doctor.pipeline import STAGES
from influence_doctor.remedies.doctored import doctor_covariances, write_factors
from influence_doctor.runner import calls
from influence_doctor.runner.run import Run

FACTOR_STAGES = ("covariance", "eigendecomposition", "lambda")
SCORE_STAGE_OF = {"pairwise": "pairwise_scores", "self": "self_scores"}

FLOAT64_FACTOR_FIELDS = (
    "activation_covariance_dtype",
    "gradient_covariance_dtype",
    "eigendecomposition_dtype",
    "per_sample_gradient_dtype",
    "lambda_dtype",
)
FLOAT64_SCORE_FIELDS = ("per_sample_gradient_dtype", "precondition_dtype", "score_dtype")


def float64_settings(factor_args: Any, score_args: Any) -> tuple[Any, Any]:
    """The same configuration with every kronfluence dtype float64 and no autocast: the reference."""
    factors, scores = copy.deepcopy(factor_args), copy.deepcopy(score_args)
    for name in FLOAT64_FACTOR_FIELDS:
        setattr(factors, name, torch.float64)
    for name in FLOAT64_SCORE_FIELDS:
        setattr(scores, name, torch.float64)
    factors.amp_dtype = None
    scores.amp_dtype = None
    return factors, scores


@dataclass
class Trial:
    """What one configuration produced on the lab's subsample, stage by stage, or the error it raised."""

    label: str
    factor_args: Any
    score_args: Any
    examples: int
    queries: int
    artifacts: dict[str, Any] = field(default_factory=dict)  # stage → kronfluence's loaded dictionary
    errors: dict[str, str] = field(default_factory=dict)  # stage → "Type: first line"
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # how long each stage took here
    damping: dict[str, float] | None = None  # per-module damping override, when one was applied
    shift: tuple[str, float] | None = None  # diagonal shift of the covariances, when one was applied
    summed_task: bool = False  # the Task's batch mean made a sum (the `task:sum` rung)

    def reached(self, stage: str) -> bool:
        return stage in self.artifacts

    def failure(self, stage: str) -> str | None:
        """Why `stage` has no result in this trial: its own error, or an earlier stage's."""
        if stage in self.errors:
            return self.errors[stage]
        for earlier in FACTOR_STAGES:
            if earlier == stage:
                break
            if earlier in self.errors:
                return f"not reached ({earlier} raised)"
        return None

    def nonfinite(self, stage: str) -> int:
        """Non-finite entries in what `stage` produced (0 when it produced nothing to count)."""
        artifact = self.artifacts.get(stage) or {}
        return sum(_nonfinite(value) for value in artifact.values())

    def scores(self, kind: str) -> torch.Tensor | None:
        artifact = self.artifacts.get(SCORE_STAGE_OF[kind])
        return None if not artifact else total_scores(artifact).detach().double().cpu()


def _nonfinite(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        if not value.dtype.is_floating_point:
            return 0
        return int((~torch.isfinite(value)).sum().item())
    if isinstance(value, Mapping):
        return sum(_nonfinite(inner) for inner in value.values())
    return 0


def settings_key(factor_args: Any, score_args: Any | None = None, **extra: Any) -> str:
    """A stable text key for a configuration: kronfluence's arguments as JSON, plus lab extras."""
    document = {"factors": factor_args.to_dict(), **extra}
    if score_args is not None:
        document["scores"] = score_args.to_dict()
    return json.dumps(document, sort_keys=True, default=str)


class Lab:
    """Runs and caches trials on a fixed subsample of the run's rehearsal data."""

    def __init__(self, run: Run, examples: int | None, queries: int | None = None, name: str = "probe") -> None:
        self.run = run
        self.name = name
        total = len(run.train_subset)
        self.examples = total if examples is None else max(0, min(examples, total))
        self.train = run.train_subset if self.examples == total else Subset(run.train_subset, range(self.examples))
        query_total = len(run.query_subset)
        self.queries = query_total if queries is None else max(0, min(queries, query_total))
        self.query = run.query_subset if self.queries == query_total else Subset(run.query_subset, range(self.queries))
        self._factors: dict[str, tuple[str, dict[str, Any], dict[str, str], dict[str, float]]] = {}
        self._trials: dict[str, Trial] = {}
        self.seconds = 0.0

    @property
    def covers_run(self) -> bool:
        """Whether this lab's subsample is the whole rehearsal (its trials measure the run's own data)."""
        return self.examples == len(self.run.train_subset) and self.queries == len(self.run.query_subset)

    # --- trials -------------------------------------------------------------------------------------

    def adopt_run(self) -> None:
        """Remember the run's own results as this lab's trial of the run's settings, when the lab covers
        the whole rehearsal: measuring them again would only repeat the run."""
        run = self.run
        if not self.covers_run:
            return
        artifacts = {name: run.artifacts[name] for name in FACTOR_STAGES if run.artifacts.get(name)}
        errors = {
            name: _error_text(record.error) for name, record in run.stages.items() if name != "train" and record.error
        }
        factor_errors = {name: text for name, text in errors.items() if name in FACTOR_STAGES}
        seconds = {name: record.seconds for name, record in run.stages.items() if record.seconds is not None}
        self._factors[settings_key(run.factor_args, shift=run.shift, **_extras(None, run.summed_task))] = (
            run.factors_name,
            artifacts,
            factor_errors,
            {name: seconds[name] for name in FACTOR_STAGES if name in seconds},
        )
        trial = Trial(
            "as configured",
            copy.deepcopy(run.factor_args),
            copy.deepcopy(run.score_args),
            self.examples,
            self.queries,
            artifacts=dict(artifacts),
            errors=errors,
            stage_seconds={name: value for name, value in seconds.items() if name != "train"},
        )
        for kind in run.pipeline.scores:
            stage = SCORE_STAGE_OF[kind]
            if run.artifacts.get(stage):
                trial.artifacts[stage] = run.artifacts[stage]
        trial.shift, trial.summed_task = run.shift, run.summed_task
        key = settings_key(
            run.factor_args,
            run.score_args,
            shift=run.shift,
            damping=None,
            kinds=tuple(run.pipeline.scores),
            **_extras(None, run.summed_task),
        )
        self._trials[key] = trial

    def configured(self) -> Trial:
        """The run's current settings on this subsample (a covariance shift a remedy applied included)."""
        return self.trial(
            self.run.factor_args,
            self.run.score_args,
            label="as configured",
            shift=self.run.shift,
            summed_task=self.run.summed_task,
        )

    def reference(self, score_args: Any | None = None) -> Trial:
        """Every dtype float64 with the run's (or the given) damping: the counterfactual of precision."""
        factor_args, scores = float64_settings(self.run.factor_args, score_args or self.run.score_args)
        summed = self.run.summed_task  # a Task made a sum is what the user meant: its float64 is the reference
        return self.trial(factor_args, scores, label="float64 end to end, same damping", summed_task=summed)

    def measured(self) -> tuple[Trial | None, Trial | None]:
        """The (configured, float64) trials if the probes already ran them; never runs anything."""
        factor_args, score_args = self.run.factor_args, self.run.score_args
        kinds = tuple(self.run.pipeline.scores)
        float64_factors, float64_scores = float64_settings(factor_args, score_args)
        extra = _extras(None, self.run.summed_task)
        key = settings_key(factor_args, score_args, shift=self.run.shift, damping=None, kinds=kinds, **extra)
        configured = self._trials.get(key)
        float64_key = settings_key(float64_factors, float64_scores, shift=None, damping=None, kinds=kinds, **extra)
        reference = self._trials.get(float64_key)
        return configured, reference

    def trial(
        self,
        factor_args: Any,
        score_args: Any,
        *,
        label: str,
        shift: tuple[str, float] | None = None,
        damping: Mapping[str, float] | None = None,
        kinds: tuple[str, ...] | None = None,
        batch_size: int | None = None,
        summed_task: bool = False,
    ) -> Trial:
        """Factors and the pipeline's scores under these settings; cached, so asking twice is free.

        `shift` = (mode, ε) adds a diagonal shift to the trial's covariances (a doctored copy) before
        the eigendecomposition. `damping` maps each tracked module to its own damping; kronfluence takes
        one damping for all modules, so modules sharing a value are scored together, the rest apart.
        `batch_size` replaces the run's train batch size (a correct Task gives the same scores at any).
        """
        damping = dict(damping) if damping else None
        kinds = tuple(kinds) if kinds is not None else tuple(self.run.pipeline.scores)
        batch = None if batch_size == self.run.train_batch_size else batch_size
        extra = _extras(batch, summed_task)
        key = settings_key(factor_args, score_args, shift=shift, damping=damping, kinds=kinds, **extra)
        if key not in self._trials:
            started = time.perf_counter()
            trial = Trial(label, copy.deepcopy(factor_args), copy.deepcopy(score_args), self.examples, self.queries)
            task = self.run.task if summed_task == self.run.summed_task else _task(self.run, summed_task)
            with calls.task_in_force(self.run.analyzer, task):
                factors_name, artifacts, errors, seconds = self._fit_factors(factor_args, shift, batch, summed_task)
                trial.artifacts.update(artifacts)
                trial.errors.update(errors)
                trial.stage_seconds.update(seconds)
                if not errors:
                    self._score(trial, factors_name, damping, kinds, batch)
            trial.damping, trial.shift, trial.summed_task = damping, shift, summed_task
            trial.seconds = time.perf_counter() - started
            self.seconds += trial.seconds
            self._trials[key] = trial
        return self._trials[key]

    def _fit_factors(
        self, factor_args: Any, shift: tuple[str, float] | None, batch_size: int | None = None, summed: bool = False
    ) -> tuple[str, dict[str, Any], dict[str, str], dict[str, float]]:
        from kronfluence.factor.config import FactorConfig

        key = settings_key(factor_args, shift=shift, **_extras(batch_size, summed))
        if key in self._factors:
            return self._factors[key]
        analyzer = self.run.analyzer
        name = f"lab-{self.name}-f{len(self._factors) + 1}"
        strategy = FactorConfig.CONFIGS[factor_args.strategy]
        artifacts: dict[str, Any] = {}
        errors: dict[str, str] = {}
        seconds: dict[str, float] = {}
        batch = batch_size or self.run.train_batch_size
        load_from: str | None = None
        steps = (
            ("covariance", strategy.requires_covariance_matrices),
            ("eigendecomposition", strategy.requires_eigendecomposition),
            ("lambda", strategy.requires_lambda_matrices),
        )
        for stage, needed in steps:
            seed_everything(self.run.seed + STAGES.index(stage))  # as the runner seeds: one setting differs
            started = time.perf_counter()
            try:
                if stage == "covariance":
                    # Called even when not needed, so kronfluence records the factor arguments.
                    calls.fit_covariance(analyzer, name, self.train, batch, factor_args)
                    if needed:
                        artifacts[stage] = calls.load(analyzer, stage, name)
                    if needed and shift is not None:
                        load_from = f"{name}-shifted"
                        doctored = doctor_covariances(artifacts[stage], *shift)
                        write_factors(analyzer.factors_output_dir(load_from), doctored, factor_args)
                        artifacts[stage] = doctored
                elif not needed:
                    continue
                elif stage == "eigendecomposition":
                    calls.eigendecompose(analyzer, name, factor_args, load_from)
                    artifacts[stage] = calls.load(analyzer, stage, name)
                else:
                    calls.fit_lambda(analyzer, name, self.train, batch, factor_args)
                    artifacts[stage] = calls.load(analyzer, stage, name)
            except Exception as exc:  # eigh failing is a measurement, not a crash
                errors[stage] = _describe(exc)
                break
            finally:
                seconds[stage] = time.perf_counter() - started
        self._factors[key] = (name, artifacts, errors, seconds)
        return self._factors[key]

    def _score(
        self,
        trial: Trial,
        factors_name: str,
        damping: dict[str, float] | None,
        kinds: tuple[str, ...],
        batch_size: int | None = None,
    ) -> None:
        for kind in kinds:
            stage = SCORE_STAGE_OF[kind]
            seed_everything(self.run.seed + STAGES.index(stage))
            started = time.perf_counter()
            try:
                trial.artifacts[stage] = self._scores_with_damping(
                    kind, factors_name, trial.score_args, damping, batch_size
                )
            except Exception as exc:
                trial.errors[stage] = _describe(exc)
            trial.stage_seconds[stage] = time.perf_counter() - started

    def _scores_with_damping(
        self,
        kind: str,
        factors_name: str,
        score_args: Any,
        damping: dict[str, float] | None,
        batch_size: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """kronfluence's scores; with per-module damping, one pass per distinct value, each module's
        own scores taken from the pass that used its damping."""
        if damping is None:
            return self._kronfluence_scores(kind, factors_name, score_args, batch_size)
        by_value: dict[float, list[str]] = {}
        for module, value in sorted(damping.items()):
            by_value.setdefault(float(value), []).append(module)
        combined: dict[str, torch.Tensor] = {}
        for value, modules in by_value.items():
            args = copy.deepcopy(score_args)
            args.damping_factor = value
            args.compute_per_module_scores = True
            per_module = self._kronfluence_scores(kind, factors_name, args, batch_size)
            combined.update({module: per_module[module] for module in modules if module in per_module})
        return combined

    def _kronfluence_scores(
        self, kind: str, factors_name: str, score_args: Any, batch_size: int | None = None
    ) -> dict[str, torch.Tensor]:
        analyzer, batch = self.run.analyzer, batch_size or self.run.train_batch_size
        name = f"{factors_name}-{kind}-{_short_hash(score_args)}{f'-b{batch_size}' if batch_size else ''}"
        if kind == "pairwise":
            query_batch = self.run.pipeline.query_batch_size
            calls.pairwise_scores(analyzer, name, factors_name, self.query, self.train, query_batch, batch, score_args)
            return calls.load(analyzer, "pairwise_scores", name)
        calls.self_scores(analyzer, name, factors_name, self.train, batch, score_args)
        return calls.load(analyzer, "self_scores", name)


def _extras(batch_size: int | None, summed_task: bool) -> dict[str, Any]:
    """What a trial changes besides kronfluence's arguments, for its cache key."""
    return {**({"batch": batch_size} if batch_size else {}), **({"summed_task": True} if summed_task else {})}


def _task(run: Run, summed: bool) -> Any:
    from influence_doctor.runner.contract import summed_task

    return summed_task(run.pipeline.task) if summed else run.pipeline.task


def _short_hash(score_args: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(score_args.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:8]


def _error_text(error: Mapping[str, str]) -> str:
    """A recorded stage error in the form trials use: "Type: first line"."""
    message = (error.get("message") or "").strip()
    return f"{error.get('type', '').rsplit('.', 1)[-1]}: {message.splitlines()[0] if message else '(no message)'}"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else '(no message)'}"
