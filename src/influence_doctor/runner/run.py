"""The records a run keeps: options, one StageRecord per stage, and the in-memory artifacts."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from influence_doctor.findings import Finding
from influence_doctor.pipeline import STAGES, Pipeline, TrainingMonitor

STAGE_STATUSES = ("ok", "warn", "fail", "error", "skipped", "not-run", "interrupted")
"""ok/warn/fail: the stage ran and its checks say so; error: it raised; skipped: the strategy does not
need it; not-run: a stage it depends on did not complete; interrupted: the run was stopped inside it."""


@dataclass
class RunOptions:
    out_dir: Path = field(default=Path("reports"), metadata={"help": "Where reports/<pipeline>/<run-id>/ go."})
    examples: int | str | None = field(
        default="auto",
        metadata={"help": "Rehearsal size: training examples analysed; auto: by time budget; None: all."},
    )
    queries: int | None = field(default=16, metadata={"help": "Query examples analysed; None uses all."})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu or cuda."})
    seed: int | None = field(default=None, metadata={"help": "Overrides Pipeline.seed when given."})
    progress: bool = field(default=True, metadata={"help": "Print per-stage progress on stderr."})
    run_id: str | None = field(default=None, metadata={"help": "Name of the run folder; a timestamp if None."})
    fix: bool = field(default=True, metadata={"help": "Apply remedies to heal what the checks find."})
    probe_examples: int = field(
        default=64, metadata={"help": "Subsample size of the float64 and damping probes; 0 turns them off."}
    )
    memory_budget: float | None = field(
        default=None, metadata={"help": "Bytes a stage may use at full size; None: the device's memory."}
    )
    prior_seconds: float = field(
        default=0.0,
        metadata={"help": "Seconds spent before diagnose() that a full run spends too (the CLI's imports)."},
    )


@dataclass
class StageRecord:
    name: str
    status: str = "not-run"
    seconds: float | None = None
    configured_dtypes: dict[str, str | None] = field(default_factory=dict)
    error: dict[str, str] | None = None  # {"type": qualified exception type, "message": text}
    reason: str | None = None  # why the stage was skipped or not run
    findings: list[Finding] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)  # the kronfluence calls made, in order
    forward_stamps: list[float] = field(default_factory=list, repr=False)  # when each batch entered the model

    @property
    def completed(self) -> bool:
        return self.status in ("ok", "warn", "fail")


@dataclass(frozen=True)
class Configuration:
    """What the treatment changes: the arguments kronfluence is called with and where its output goes.

    A remedy replaces the run's configuration as a whole (`dataclasses.replace`), so what the user asked
    for and what each rung changed stay separate from what the stages produced (the `Run`)."""

    factor_args: Any
    score_args: Any
    batch_size: int | None = None  # overrides Pipeline.batch_size (the out-of-memory rung halves it)
    factors_name: str = "factors"
    scores_tag: str = ""  # suffix that keeps each remedy's scores in their own folders
    shift: tuple[str, float] | None = None  # the diagonal shift (mode, ε) the current covariances carry
    covariance_shift: str | None = None  # the same shift, as a person reads it
    summed_task: bool = False  # the Task's batch mean multiplied by the batch size (the `task:sum` rung)


def _configured(name: str) -> property:
    """A Run attribute that reads and replaces one field of the run's Configuration."""

    def get(run: Run) -> Any:
        return getattr(run.configuration, name)

    def set_(run: Run, value: Any) -> None:
        run.configuration = replace(run.configuration, **{name: value})

    return property(get, set_, doc=f"The configuration's {name} (see Configuration).")


@dataclass
class Run:
    """Everything one pass through the pipeline produced; the checks read it, the report serialises it.

    The settings it ran with are `configuration`, which the treatment replaces; `factor_args`,
    `score_args`, `batch_size`, `factors_name`, `scores_tag`, `shift` and `covariance_shift` read it."""

    pipeline: Pipeline
    options: RunOptions
    run_dir: Path
    device: str
    seed: int
    configuration: Configuration
    model: Any = None
    analyzer: Any = None
    train_subset: Any = None
    query_subset: Any = None
    train_indices: list[int] = field(default_factory=list)
    query_indices: list[int] = field(default_factory=list)
    train_examples_total: int = 0
    query_examples_total: int = 0
    monitor: TrainingMonitor = field(default_factory=TrainingMonitor)
    stages: dict[str, StageRecord] = field(default_factory=lambda: {name: StageRecord(name) for name in STAGES})
    artifacts: dict[str, Any] = field(default_factory=dict)  # covariance, eigendecomposition, lambda, scores
    interrupted_in: str | None = None
    probes: dict[str, Any] = field(default_factory=dict)  # summaries of the precision and damping probes
    headroom: dict[str, Any] = field(default_factory=dict)  # subject → checks.headroom.Headroom, projected
    rehearsal_plan: dict[str, Any] = field(default_factory=dict)  # how the time budget sized the rehearsal
    full_size: Any = None  # overflow.FullSizeCovariance: covariance passes over all the data, when one was measured
    exact_pairwise: Any = None  # (final, exact) pairwise scores when exact influence was computed, for the plots
    private_analysis_dir: Path | None = None  # a rank's own kronfluence folder when kronfluence does not shard
    started: float | None = None  # time.perf_counter() when the diagnosis began, for the report's timing

    factor_args = _configured("factor_args")
    score_args = _configured("score_args")
    batch_size = _configured("batch_size")
    factors_name = _configured("factors_name")
    scores_tag = _configured("scores_tag")
    shift = _configured("shift")
    covariance_shift = _configured("covariance_shift")
    summed_task = _configured("summed_task")

    @property
    def task(self) -> Any:
        """The Task kronfluence is given: the user's, or the user's made a sum over examples."""
        from influence_doctor.runner.contract import summed_task

        return summed_task(self.pipeline.task) if self.summed_task else self.pipeline.task

    @property
    def train_batch_size(self) -> int:
        return self.batch_size or self.pipeline.batch_size

    def scores_name(self, kind: str) -> str:
        return f"{self.factors_name}{self.scores_tag}_{kind}"

    @property
    def analysis_dir(self) -> Path:
        """Where kronfluence writes: inside the run's own folder (under torchrun on the CPU, where each
        rank runs kronfluence whole, ranks other than 0 write to a temporary folder of their own)."""
        return self.private_analysis_dir or self.run_dir / "kronfluence"
