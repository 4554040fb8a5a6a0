"""The one executor: a configuration run at a scope, stage by stage, each stage computed once.

Every verdict the doctor reaches rests on a trial: the run itself (the rehearsal scope's trial of the
current configuration), the float64 reference, an experiment, a rung rehearsed on the probe, the pilots
that size the rehearsal, the covariance accumulated over all the data. They all come from here, and this
is the only module that calls kronfluence's stages (through `calls.py`), so the stage sequence is
written once: covariance → (a diagonal shift, when configured) → eigendecomposition → lambda → scores.

A stage's result is cached under its scope and its stage key (`Configuration.stage_key`), which covers
exactly the settings it and the stages before it read: two configurations share every stage before the
first one they differ in, so a damping change re-runs only the scores and a rung rehearsed on the
whole rehearsal costs nothing more when it is applied. Seeds are set per stage (the run's seed plus the
stage's index), so a stage computes the same numbers whenever it is computed. A stage that raises is a
result (its error), never a crash; the stages that needed it are `not-run`. kronfluence's files go into
the run's own folder, one factors folder per configuration of the factors, never anywhere else.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from influence_doctor import distributed
from influence_doctor.configuration import Configuration
from influence_doctor.environment import seed_everything
from influence_doctor.pipeline import FACTOR_STAGES, INFLUENCE_STAGES, SCORE_STAGE_OF, STAGES
from influence_doctor.runner import calls, sampling
from influence_doctor.runner.batch_clock import ForwardClock
from influence_doctor.runner.doctored import doctor_covariances, write_factors
from influence_doctor.runner.memory import PeakMemory

SCORE_STAGES = ("pairwise_scores", "self_scores")


@dataclass(frozen=True)
class Scope:
    """Which data a trial runs on: a prefix of the rehearsal's training examples and of its queries."""

    name: str  # "rehearsal" (the run), "probe", "fidelity", "pilot", "warmup"
    key: str  # the name and the examples' indices
    train: Any = field(compare=False, hash=False, repr=False)  # Subset of the training data
    query: Any = field(compare=False, hash=False, repr=False)  # Subset of the queries

    @property
    def examples(self) -> int:
        return len(self.train)

    @property
    def queries(self) -> int:
        return len(self.query)


@dataclass
class StageResult:
    """What one stage produced in one trial: its artifact (kronfluence's loaded dictionary), or why not."""

    name: str
    status: str = "not-run"  # ok (it completed; the checks give its verdict), error, skipped, not-run, interrupted
    seconds: float | None = None
    artifact: Any = None
    error: dict[str, str] | None = None  # {"type": qualified exception type, "message": text}
    reason: str | None = None  # why it was skipped or not run
    calls: list[str] = field(default_factory=list)  # the kronfluence calls it made
    memory: dict[str, Any] | None = None  # its peak memory (`runner.memory.PeakMemory`)
    forward_stamps: list[float] = field(default_factory=list, repr=False)  # when each batch entered the model
    folder: str | None = None  # the kronfluence name its files are under
    key: str = ""  # its stage key

    @property
    def completed(self) -> bool:
        return self.status == "ok"

    def stored(self) -> dict[str, Any]:
        """Shapes and dtypes of what kronfluence wrote: {factor: {module: {shape, dtype}}}."""
        stored: dict[str, Any] = {}
        for factor, per_module in (self.artifact or {}).items():
            stored[factor] = (
                {module: _shape_and_dtype(tensor) for module, tensor in per_module.items()}
                if isinstance(per_module, dict)
                else _shape_and_dtype(per_module)
            )
        return stored

    @property
    def error_text(self) -> str | None:
        """The error as one line: "Type: first line of the message"."""
        if self.error is None:
            return None
        message = (self.error.get("message") or "").strip()
        first = message.splitlines()[0] if message else "(no message)"
        return f"{self.error.get('type', '').rsplit('.', 1)[-1]}: {first}"


@dataclass
class Trial:
    """One configuration at one scope: a result per influence stage."""

    configuration: Configuration
    scope: Scope
    kinds: tuple[str, ...]
    label: str = ""
    stages: dict[str, StageResult] = field(default_factory=dict)
    seconds: float = 0.0  # what computing it cost (stages shared with an earlier trial cost nothing)
    interrupted_in: str | None = None

    @property
    def examples(self) -> int:
        return self.scope.examples

    @property
    def queries(self) -> int:
        return self.scope.queries

    @property
    def factor_args(self) -> Any:
        return self.configuration.factor_args

    @property
    def score_args(self) -> Any:
        return self.configuration.score_args

    @property
    def damping(self) -> dict[str, float] | None:
        return self.configuration.damping

    @property
    def shift(self) -> tuple[str, float] | None:
        return self.configuration.shift

    @property
    def summed_task(self) -> bool:
        return self.configuration.summed_task

    @property
    def artifacts(self) -> dict[str, Any]:
        return {name: r.artifact for name, r in self.stages.items() if r.completed and r.artifact is not None}

    @property
    def errors(self) -> dict[str, str]:
        return {name: r.error_text for name, r in self.stages.items() if r.error is not None}

    @property
    def stage_seconds(self) -> dict[str, float]:
        return {name: r.seconds for name, r in self.stages.items() if r.seconds is not None}

    def reached(self, stage: str) -> bool:
        return stage in self.artifacts

    def failure(self, stage: str) -> str | None:
        """Why `stage` has no result in this trial: its own error, or an earlier factor stage's."""
        result = self.stages.get(stage)
        if result is not None and result.error is not None:
            return result.error_text
        for earlier in FACTOR_STAGES:
            if earlier == stage:
                break
            if (upstream := self.stages.get(earlier)) is not None and upstream.error is not None:
                return f"not reached ({earlier} raised)"
        return None

    def nonfinite(self, stage: str) -> int:
        """Non-finite entries in what `stage` produced (0 when it produced nothing to count)."""
        artifact = self.artifacts.get(stage) or {}
        return sum(_nonfinite(value) for value in artifact.values())

    def scores(self, kind: str) -> torch.Tensor | None:
        from influence_doctor.checks.scores import total_scores

        artifact = self.artifacts.get(SCORE_STAGE_OF[kind])
        return None if not artifact else total_scores(artifact).detach().double().cpu()


@dataclass(frozen=True)
class FullSizeCount:
    """What one covariance pass over the training data held, per `module/factor` subject: over all of it,
    or up to the slice after which a sum was first non-finite (`examples` of `total_examples`)."""

    examples: int
    nonfinite: dict[str, int]
    entries: dict[str, int]
    seconds: float
    error: str | None = None  # the stage raised instead
    total_examples: int = 0

    def total(self, subjects: Any = None) -> int:
        keys = self.nonfinite if subjects is None else [s for s in subjects if s in self.nonfinite]
        return sum(self.nonfinite[s] for s in keys)


FULL_SIZE_SLICES = 8
"""Consecutive slices of the data the full-size covariance pass accumulates (each at least one batch): the
running sums are checked after each, so an overflow stops the pass within an eighth of the data of where
it happened, for one kronfluence call per slice."""

COVARIANCE_FACTORS = ("activation_covariance", "gradient_covariance")

Verdict = Callable[[StageResult], str]
"""For the run's own trial: a stage's verdict (ok, warn, fail, error) once its checks ran, for the progress line."""


class Executor:
    """Runs trials of one session's pipeline and keeps every stage it computed."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self._results: dict[tuple[str, str, str], StageResult] = {}
        self._trials: dict[tuple[str, str, tuple[str, ...]], Trial] = {}
        self._recorded_arguments: set[tuple[str, str]] = set()
        self._full_size: dict[str, FullSizeCount] = {}
        self._spent: dict[str, float] = {}
        self.in_progress: Trial | None = None  # the run's trial while its stages run (a partial report reads it)

    # --- scopes ---------------------------------------------------------------------------------------

    def scope(self, name: str, examples: int | None = None, queries: int | None = None) -> Scope:
        """The first `examples` training examples and `queries` queries of the rehearsal (None: all)."""
        from torch.utils.data import Subset

        session = self.session
        train = session.train_subset if session.train_subset is not None else []
        query = session.query_subset if session.query_subset is not None else []
        n = len(train) if examples is None else max(0, min(examples, len(train)))
        q = len(query) if queries is None else max(0, min(queries, len(query)))
        indices = session.train_indices[:n]
        digest = hashlib.sha256(json.dumps([indices, session.query_indices[:q]]).encode()).hexdigest()[:10]
        return Scope(
            name,
            f"{name}-{n}x{q}-{digest}",
            train if n == len(train) else Subset(train, range(n)),
            query if q == len(query) else Subset(query, range(q)),
        )

    def seconds(self, scope: Scope | None = None) -> float:
        """What computing stages at `scope` (at every scope: None) has cost so far."""
        if scope is None:
            return sum(self._spent.values())
        return self._spent.get(scope.key, 0.0)

    # --- trials ---------------------------------------------------------------------------------------

    def cached(self, configuration: Configuration, scope: Scope, kinds: tuple[str, ...] | None = None) -> Trial | None:
        """The trial if it was already run; never runs anything."""
        kinds = tuple(kinds) if kinds is not None else self.session.kinds
        return self._trials.get((scope.key, configuration.key, kinds))

    def trial(
        self,
        configuration: Configuration,
        scope: Scope,
        kinds: tuple[str, ...] | None = None,
        *,
        label: str = "",
        announce: bool = False,
        verdict: Verdict | None = None,
    ) -> Trial:
        """`configuration` at `scope`, computing the `kinds` of scores (default: the pipeline's); cached.

        `announce` marks the run's own trial: each stage says on stderr what it did (with `verdict`'s
        status), and kronfluence draws its progress bars on a terminal."""
        kinds = tuple(kinds) if kinds is not None else self.session.kinds
        key = (scope.key, configuration.key, kinds)
        if key in self._trials:
            return self._trials[key]
        trial = Trial(configuration, scope, kinds, label)
        if announce:
            self.in_progress = trial
        started = time.perf_counter()
        analyzer = self.session.analyzer
        bars = getattr(analyzer, "disable_tqdm", True)
        if analyzer is not None:
            analyzer.disable_tqdm = not (announce and self.session.progress.interactive)
        try:
            self._run_stages(trial, announce, verdict)
        finally:
            if analyzer is not None:
                analyzer.disable_tqdm = bars
            trial.seconds = time.perf_counter() - started
        if announce:
            self.in_progress = None
        self._trials[key] = trial
        return trial

    def _run_stages(self, trial: Trial, announce: bool, verdict: Verdict | None) -> None:
        """The stage sequence, once for every trial."""
        configuration, scope, session = trial.configuration, trial.scope, self.session
        strategy = configuration.factor_args.strategy
        blocked = session.preflight_blocked
        folder = self._factors_folder(configuration, scope)
        covariance_folder: str | None = None
        factors_name = folder
        blocker: str | None = None if session.ready else "train"
        for stage in INFLUENCE_STAGES:
            skip = calls.skipped_because(stage, strategy, trial.kinds)
            if blocked:
                reason = f"pre-flight: {', '.join(blocked)} cannot be factored as configured"
                result = StageResult(stage, "not-run", reason=reason)
            elif skip is not None:
                result = StageResult(stage, "skipped", reason=skip)
                if stage == "covariance" and session.ready:  # kronfluence still records the factor arguments
                    self._record_arguments(configuration, folder)
            elif blocker is not None:
                result = StageResult(stage, "not-run", reason=f"stage {blocker!r} did not complete")
            else:
                source = covariance_folder if stage == "eigendecomposition" else factors_name
                result = self._stage(stage, trial, folder, source, announce, verdict)
                if stage == "covariance" and result.completed:
                    result = self._shifted(result, configuration, scope)
                    covariance_folder = result.folder
                elif stage in ("eigendecomposition", "lambda") and result.completed:
                    factors_name = result.folder
                if not result.completed and stage in FACTOR_STAGES:
                    blocker = stage
            trial.stages[stage] = result
            if announce and result.status in ("skipped", "not-run"):
                session.progress.end(stage, result.status, detail=result.reason or "")

    def _stage(
        self, stage: str, trial: Trial, folder: str, source: str | None, announce: bool, verdict: Verdict | None
    ) -> StageResult:
        """One stage of `trial`, cached under its scope and stage key, else computed: a factor stage into
        `folder`, starting from what an earlier stage left under `source` when that is another folder; a
        score stage from the factors under `source`."""
        configuration, scope = trial.configuration, trial.scope
        key = configuration.stage_key(stage)
        cache_key = (scope.key, stage, key)
        if cache_key in self._results:
            return self._results[cache_key]
        if announce:
            self.session.progress.start(stage)
        name = f"{scope.name}-{stage.split('_')[0]}-{key}" if stage in SCORE_STAGES else folder
        result = StageResult(stage, key=key, folder=name, calls=[calls.CALL_NAMES[stage]])
        seed_everything(self.session.seed + STAGES.index(stage))
        started = time.perf_counter()
        measured = scope.name == "rehearsal"  # the run's stages: what the projection reads
        model, analyzer = self.session.prepared_for(configuration)
        try:
            with (
                calls.task_in_force(analyzer, self.session.task_for(configuration)),
                model_form(configuration),
                self._draws(configuration, stage),
                PeakMemory(self.session.device) if measured else nullcontext() as peak,
                ForwardClock(model) if measured else nullcontext() as clock,
            ):
                result.artifact = self._compute(stage, configuration, scope, name, source, analyzer)
            result.seconds = time.perf_counter() - started
            if measured:
                result.memory, result.forward_stamps = peak.to_dict(), clock.stamps
            result.status = "ok"
        except KeyboardInterrupt:
            result.status, result.seconds = "interrupted", time.perf_counter() - started
            trial.interrupted_in = stage
            trial.stages[stage] = result
            if announce:
                self.session.progress.end(stage, result.status, result.seconds)
            raise
        except Exception as exc:  # a failure inside the user's or kronfluence's code is data, not a crash
            result.status, result.seconds = "error", time.perf_counter() - started
            result.error = {"type": _qualified_name(type(exc)), "message": str(exc).strip()}
        finally:
            self._spent[scope.key] = self._spent.get(scope.key, 0.0) + (time.perf_counter() - started)
        self._results[cache_key] = result
        if announce:
            status = verdict(result) if verdict is not None else result.status
            self.session.progress.end(stage, status, result.seconds, result.error_text or "")
        return result

    def _compute(
        self, stage: str, configuration: Configuration, scope: Scope, name: str, source: str | None, analyzer: Any
    ) -> Any:
        """One kronfluence call (a scoring pass per distinct damping for a per-module damping), and what it wrote."""
        fa, batch = configuration.factor_args, configuration.batch_size
        load_from = None if source == name else source
        if stage == "covariance":
            calls.fit_covariance(analyzer, name, scope.train, batch, fa)
        elif stage == "eigendecomposition":
            calls.eigendecompose(analyzer, name, fa, load_from)
        elif stage == "lambda":
            calls.fit_lambda(analyzer, name, scope.train, batch, fa, load_from)
        elif configuration.module_damping is not None:
            return self._scores_per_module_damping(stage, name, source, configuration, scope, analyzer)
        else:
            self._scores(stage, name, source, configuration.score_args, configuration, scope, analyzer)
        return calls.load(analyzer, stage, name)

    def _scores(
        self,
        stage: str,
        name: str,
        factors: str | None,
        score_args: Any,
        configuration: Configuration,
        scope: Scope,
        analyzer: Any,
    ) -> None:
        if stage == "pairwise_scores":
            calls.pairwise_scores(
                analyzer,
                name,
                factors,
                scope.query,
                scope.train,
                configuration.query_batch_size,
                configuration.batch_size,
                score_args,
            )
        else:
            calls.self_scores(analyzer, name, factors, scope.train, configuration.batch_size, score_args)

    def _scores_per_module_damping(
        self, stage: str, name: str, factors: str | None, configuration: Configuration, scope: Scope, analyzer: Any
    ) -> dict[str, torch.Tensor]:
        """kronfluence takes one damping for every module: with a per-module damping, one scoring pass per
        distinct value, each module's own scores taken from the pass that used its damping."""
        by_value: dict[float, list[str]] = {}
        for module, value in configuration.module_damping or ():
            by_value.setdefault(float(value), []).append(module)
        combined: dict[str, torch.Tensor] = {}
        for index, (value, modules) in enumerate(by_value.items()):
            score_args = configuration.score_args.replace(damping_factor=value, compute_per_module_scores=True)
            part = f"{name}-d{index}"
            seed_everything(self.session.seed + STAGES.index(stage))
            self._scores(stage, part, factors, score_args, configuration, scope, analyzer)
            per_module = calls.load(analyzer, stage, part)
            combined.update({module: per_module[module] for module in modules if module in per_module})
        return combined

    def _shifted(self, result: StageResult, configuration: Configuration, scope: Scope) -> StageResult:
        """The covariance as the eigendecomposition sees it: with the configuration's diagonal shift, a
        doctored copy written to a new factors folder (never over the original)."""
        if configuration.shift is None or configuration.factor_args.strategy not in ("kfac", "ekfac"):
            return result
        mode, epsilon = configuration.shift
        key = f"{result.key}-{mode}-{epsilon:g}"
        cache_key = (scope.key, "covariance-shifted", key)
        if cache_key not in self._results:
            doctored = doctor_covariances(result.artifact, mode, epsilon)
            folder = f"{result.folder}__doctored_{mode}-{epsilon:g}"
            write_factors(self.session.analyzer.factors_output_dir(folder), doctored, configuration.factor_args)
            self._results[cache_key] = StageResult(
                "covariance",
                "ok",
                result.seconds,
                doctored,
                calls=result.calls,
                memory=result.memory,
                forward_stamps=result.forward_stamps,
                folder=folder,
                key=key,
            )
        return self._results[cache_key]

    def _draws(self, configuration: Configuration, stage: str, first_example: int = 0) -> Any:
        """The true Fisher's targets for one stage: drawn per example from the run's seed, the
        configuration's sampling seed and the stage, identical in every trial at that seed."""
        world = distributed.current()  # each rank draws its own examples' targets when kronfluence shards them
        rank = world.rank if world.distributed and distributed.kronfluence_distributes() else 0
        seed = sampling.stage_seed(self.session.seed, configuration.sampling_seed, STAGES.index(stage), rank)
        return sampling.drawing(seed, first_example)

    def _record_arguments(self, configuration: Configuration, folder: str) -> None:
        """For a strategy that fits no covariance, kronfluence's covariance call still writes the factor
        arguments that the later stages read."""
        if (folder, "arguments") in self._recorded_arguments:
            return
        session = self.session
        _model, analyzer = session.prepared_for(configuration)
        calls.fit_covariance(
            analyzer, folder, session.train_subset, configuration.batch_size, configuration.factor_args
        )
        self._recorded_arguments.add((folder, "arguments"))

    def _factors_folder(self, configuration: Configuration, scope: Scope) -> str:
        """One kronfluence factors folder per configuration of the factors and scope."""
        prefix = "factors" if scope.name == "rehearsal" else f"{scope.name}-factors"
        return f"{prefix}-{configuration.stage_key('lambda')}"

    # --- the covariance over all the data -------------------------------------------------------------

    def full_size_covariance(self, configuration: Configuration) -> FullSizeCount:
        """kronfluence's covariance stage over every training example, in the configured dtype, adding each
        slice's sums to the running sums in that dtype (as the stage itself accumulates batch after batch),
        stopping at the first slice after which a sum is non-finite: a projected overflow, measured.
        Cached per configuration of the covariance."""
        from torch.utils.data import Subset

        key = configuration.stage_key("covariance")
        if key in self._full_size:
            return self._full_size[key]
        session = self.session
        dataset = session.train_dataset  # every training example, in the data set's own order
        total = len(dataset)
        batch = configuration.batch_size
        width = max(batch, math.ceil(total / FULL_SIZE_SLICES))
        seed_everything(session.seed + STAGES.index("covariance"))
        started = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        seen = 0
        count: FullSizeCount | None = None
        for index, start in enumerate(range(0, total, width)):
            part = Subset(dataset, range(start, min(total, start + width)))
            name = f"full-covariance-{key}-{index + 1}"
            try:
                _model, analyzer = session.prepared_for(configuration)
                with (
                    calls.task_in_force(analyzer, session.task_for(configuration)),
                    model_form(configuration),
                    self._draws(configuration, "covariance", first_example=start),
                ):
                    calls.fit_covariance(analyzer, name, part, batch, configuration.factor_args)
                artifact = calls.load(analyzer, "covariance", name)
            except Exception as exc:  # an allocator or kronfluence failure: the measurement did not happen
                text = str(exc).strip().splitlines()
                error = f"{type(exc).__name__}: {text[0] if text else ''}"
                count = FullSizeCount(seen, {}, {}, time.perf_counter() - started, error, total)
                break
            for factor in COVARIANCE_FACTORS:
                for module, tensor in (artifact.get(factor) or {}).items():
                    subject = f"{module}/{factor}"
                    sums[subject] = tensor.clone() if subject not in sums else sums[subject].add_(tensor)
            seen += len(part)
            if any(not bool(torch.isfinite(tensor).all()) for tensor in sums.values()):
                break
        if count is None:
            nonfinite = {subject: int((~torch.isfinite(tensor)).sum()) for subject, tensor in sums.items()}
            entries = {subject: tensor.numel() for subject, tensor in sums.items()}
            count = FullSizeCount(seen, nonfinite, entries, time.perf_counter() - started, None, total)
        self._full_size[key] = count
        return count

    @property
    def full_size_counts(self) -> list[FullSizeCount]:
        return list(self._full_size.values())


@contextmanager
def model_form(configuration: Configuration) -> Iterator[None]:
    """The model as the configuration runs it: with `recompute="non-reentrant"`, every reentrant
    `torch.utils.checkpoint` call (however the model reached the function) runs the non-reentrant way."""
    if configuration.recompute != "non-reentrant":
        yield
        return
    import torch.utils.checkpoint as checkpointing

    reentrant = checkpointing.CheckpointFunction.apply

    def non_reentrant(function: Any, preserve_rng_state: bool, *args: Any) -> Any:
        return checkpointing.checkpoint(function, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state)

    checkpointing.CheckpointFunction.apply = non_reentrant
    try:
        yield
    finally:
        checkpointing.CheckpointFunction.apply = reentrant


def _nonfinite(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        if not value.dtype.is_floating_point:
            return 0
        return int((~torch.isfinite(value)).sum().item())
    if isinstance(value, dict):
        return sum(_nonfinite(inner) for inner in value.values())
    return 0


def _shape_and_dtype(tensor: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).replace("torch.", "")}


def _qualified_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}" if kind.__module__ != "builtins" else kind.__qualname__
