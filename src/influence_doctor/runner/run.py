"""The run: a session, its executor, the configuration the treatment has reached, and that configuration's
trial at the rehearsal scope, with each stage's verdict as the checks gave it (`examine.StageRecord`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from influence_doctor.configuration import Configuration
from influence_doctor.options import RunOptions
from influence_doctor.pipeline import Pipeline, TrainingMonitor
from influence_doctor.runner.executor import Executor, Scope, StageResult, Trial
from influence_doctor.runner.session import Session


@dataclass
class Run:
    """Everything one diagnosis computed so far; the checks read it, the report serialises it."""

    session: Session
    executor: Executor
    asked: Configuration  # what the pipeline asks for
    configuration: Configuration  # what the treatment has reached (the asked one until a rung is kept)
    trial: Trial | None = None  # the rehearsal scope's trial of `configuration`: the run's stages
    stages: dict[str, Any] = field(default_factory=dict)  # stage → examine.StageRecord, as the checks left it
    probes: dict[str, Any] = field(default_factory=dict)  # summaries of the probes, for the report
    headroom: dict[str, Any] = field(default_factory=dict)  # subject → checks.headroom.Headroom, projected
    rehearsal_plan: dict[str, Any] = field(default_factory=dict)  # how the time budget sized the rehearsal
    exact_pairwise: Any = None  # (final, exact) pairwise scores when exact influence was computed, for the plots
    started: float | None = None  # time.perf_counter() when the diagnosis began, for the report's timing
    stopped_in: str | None = None  # where a stopped run stopped, outside any stage ("checks", "remedy 2")
    rehearsal: Scope | None = None  # the rehearsal's data, once its size is chosen: the run's scope
    audits: dict[str, Any] = field(default_factory=dict)  # configuration key → its hooks audit (audit/hooks.py)

    def stage_results(self) -> dict[str, StageResult]:
        """The train stage's result and the run's trial's (or the one whose stages were running)."""
        trial = self.trial if self.executor.in_progress is None else self.executor.in_progress
        return {"train": self.session.train_result, **(trial.stages if trial is not None else {})}

    # --- the session, as the report and the checks read it -------------------------------------------------

    pipeline: Pipeline = field(init=False)
    options: RunOptions = field(init=False)
    run_dir: Path = field(init=False)
    device: str = field(init=False)
    seed: int = field(init=False)
    monitor: TrainingMonitor = field(init=False)

    def __post_init__(self) -> None:
        session = self.session
        self.pipeline, self.options, self.run_dir = session.pipeline, session.options, session.run_dir
        self.device, self.seed, self.monitor = session.device, session.seed, session.monitor

    @property
    def analysis_dir(self) -> Path:
        return self.session.analysis_dir

    @property
    def model(self) -> Any:
        """The prepared model the configuration's stages run (the run's, or a copy tracking other modules)."""
        return self.session.prepared_for(self.configuration)[0]

    @property
    def analyzer(self) -> Any:
        return self.session.analyzer

    @property
    def train_indices(self) -> list[int]:
        return self.session.train_indices

    @property
    def query_indices(self) -> list[int]:
        return self.session.query_indices

    @property
    def train_subset(self) -> Any:
        return self.session.train_subset

    @property
    def query_subset(self) -> Any:
        return self.session.query_subset

    @property
    def train_examples_total(self) -> int:
        return self.session.train_examples_total

    @property
    def query_examples_total(self) -> int:
        return self.session.query_examples_total

    @property
    def interrupted_in(self) -> str | None:
        """The stage the run was stopped in (or where outside the stages), None when it was not stopped."""
        if self.session.train_result.status == "interrupted":
            return "train"
        trial = self.executor.in_progress
        if trial is not None and trial.interrupted_in is not None:
            return trial.interrupted_in
        return self.stopped_in

    # --- the configuration, as the report and the checks read it --------------------------------------------

    @property
    def factor_args(self) -> Any:
        return self.configuration.factor_args

    @property
    def score_args(self) -> Any:
        return self.configuration.score_args

    @property
    def task(self) -> Any:
        """The Task as the configuration hands it to kronfluence (the user's, or made a sum)."""
        return self.session.task_for(self.configuration)

    @property
    def train_batch_size(self) -> int:
        return self.configuration.batch_size

    @property
    def summed_task(self) -> bool:
        return self.configuration.summed_task

    @property
    def shift(self) -> tuple[str, float] | None:
        return self.configuration.shift

    @property
    def covariance_shift(self) -> str | None:
        """The diagonal shift the covariances carry, as a person reads it."""
        from influence_doctor.changes import shift_description

        return shift_description(self.configuration.shift) if self.configuration.shift else None

    @property
    def artifacts(self) -> dict[str, Any]:
        """What the run's stages produced, by stage."""
        results = self.stage_results()
        return {name: r.artifact for name, r in results.items() if name != "train" and r.completed and r.artifact}
