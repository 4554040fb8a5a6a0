"""The healing loop: one rung at a time, re-run only what it invalidates, re-check, stop when healed.

Each rung applies on top of the current configuration (the dtype and damping ladders supersede their
own earlier rungs); a diagonal shift always starts from the last undoctored covariances. Every rung
tried is recorded with what it changed, the stages it re-ran, the kronfluence calls and the outcome.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.diagnosis import Problem, diagnose_findings, stage_views
from influence_doctor.examine import examine_stage, reexamine
from influence_doctor.pipeline import STAGES
from influence_doctor.progress import StageProgress
from influence_doctor.remedies.doctored import doctor_covariances, write_factors
from influence_doctor.remedies.ladders import ladder_for
from influence_doctor.remedies.rungs import Change, Settings, heuristic_damping, plan
from influence_doctor.runner.run import Run
from influence_doctor.runner.stages import run_influence_stages

MAX_RUNGS = 12
"""Rungs tried before the doctor gives up: every ladder is shorter, so this only stops pathologies
that trade one problem for another forever."""


@dataclass
class Snapshot:
    """Scores of one configuration, for the fidelity comparison."""

    label: str
    scores: dict[str, Any]
    finite: bool
    regularization: dict[str, Any]


@dataclass
class Remedy:
    cause: str | None
    rung: str
    change: str
    changes: dict[str, tuple[Any, Any]]
    first_stage: str
    stages_rerun: list[str]
    calls: list[str]
    outcome: str  # "healed" | "resolved" (this cause gone, others left) | "not-resolved" | "error"
    seconds: float
    problems_after: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)  # rungs that could not act, and why
    error: str | None = None  # what stopped the rung, when its outcome is "error"

    def to_dict(self) -> dict[str, Any]:
        return {
            "cause": self.cause,
            "rung": self.rung,
            "change": self.change,
            "changes": {key: [_plain(old), _plain(new)] for key, (old, new) in self.changes.items()},
            "first_stage": self.first_stage,
            "stages_rerun": self.stages_rerun,
            "calls": self.calls,
            "outcome": self.outcome,
            "seconds": self.seconds,
            "problems_after": self.problems_after,
            "skipped": self.skipped,
            "error": self.error,
        }


@dataclass
class HealResult:
    remedies: list[Remedy]
    problems: list[Problem]
    snapshots: list[Snapshot]
    exhausted: list[str]  # causes whose ladder ran out


def heal(
    run: Run,
    problems: list[Problem],
    progress: StageProgress,
    thresholds: Thresholds | None = None,
    ladders: Mapping[str, list[str]] | None = None,
    on_rung: Callable[[Remedy], None] | None = None,
) -> HealResult:
    """Climb the ladders of the treatable problems until none is left or the ladders run out."""
    remedies: list[Remedy] = []
    snapshots = [snapshot(run, "as configured")]
    tried: dict[str | None, set[str]] = {}
    exhausted: list[str] = []
    base_covariance = run.artifacts.get("covariance")
    base_factors = run.factors_name
    while len(remedies) < MAX_RUNGS:
        treatable = [p for p in problems if p.treatable and (p.cause or "unexplained") not in exhausted]
        if not treatable:
            break
        problem = treatable[0]
        change, skipped = _next_change(problem, run, tried.setdefault(problem.cause, set()), ladders)
        if change is None:
            exhausted.append(problem.cause or "unexplained")
            progress.note(f"no rung left for {problem.cause or 'an unexplained failure'}")
            continue
        progress.note(f"remedy {len(remedies) + 1}: {problem.cause} → {change.rung} ({change.description})")
        started = time.perf_counter()
        index = len(remedies) + 1
        before = {name: id(record) for name, record in run.stages.items()}
        outcome, error = "not-resolved", None
        try:
            if change.shift is None and change.first_stage == "covariance":
                base_covariance = None  # a fresh covariance becomes the new base once computed
            _apply(run, change, index, base_factors, base_covariance, progress, thresholds)
            if change.first_stage == "covariance":
                base_covariance = run.artifacts.get("covariance")
                base_factors = run.factors_name
        except Exception as exc:  # writing doctored files can fail (disk full): record, stop climbing
            outcome, error = "error", f"{type(exc).__name__}: {exc}"
            progress.note(f"remedy failed: {error}")
        rerun = [name for name in STAGES if id(run.stages[name]) != before[name]]
        problems = diagnose_findings(stage_views(run))
        causes_after = [p.cause or "unexplained" for p in problems]
        if outcome != "error":
            outcome = "healed" if not problems else "resolved" if problem.cause not in causes_after else "not-resolved"
        remedy = Remedy(
            cause=problem.cause,
            rung=change.rung,
            change=change.description,
            changes=change.changes,
            first_stage=change.first_stage,
            stages_rerun=rerun,
            calls=[call for name in rerun for call in run.stages[name].calls],
            outcome=outcome,
            seconds=time.perf_counter() - started,
            problems_after=causes_after,
            skipped=skipped,
            error=error,
        )
        remedies.append(remedy)
        snapshots.append(snapshot(run, f"after {change.rung}"))
        if on_rung is not None:
            on_rung(remedy)
        if outcome == "error":
            break
    return HealResult(remedies, problems, snapshots, exhausted)


def _next_change(
    problem: Problem, run: Run, tried: set[str], ladders: Mapping[str, list[str]] | None
) -> tuple[Change | None, list[dict[str, str]]]:
    settings = Settings(
        factor_args=run.factor_args,
        score_args=run.score_args,
        batch_size=run.train_batch_size,
        score_stage="pairwise_scores" if "pairwise" in run.pipeline.scores else "self_scores",
        heuristic_damping=heuristic_damping(run.artifacts, run.factor_args.strategy),
    )
    skipped = []
    for rung in ladder_for(problem.cause, ladders):
        if rung in tried:
            continue
        tried.add(rung)
        change, reason = plan(rung, problem, settings)
        if change is not None:
            return change, skipped
        skipped.append({"rung": rung, "reason": reason})
    return None, skipped


def _apply(
    run: Run,
    change: Change,
    index: int,
    base_factors: str,
    base_covariance: dict[str, Any] | None,
    progress: StageProgress,
    thresholds: Thresholds | None,
) -> None:
    """Set the new arguments and re-run from the first invalidated stage, then re-check the rest."""
    run.factor_args, run.score_args = change.factor_args, change.score_args
    if change.batch_size is not None:
        run.batch_size = change.batch_size
    examine = lambda record: examine_stage(run, record, thresholds)  # noqa: E731
    slug = f"r{index}"
    first = change.first_stage
    covariance_from = None
    if change.shift is not None:
        if base_covariance is None:
            raise RuntimeError("no covariance to shift")
        doctored_name = f"{base_factors}__doctored_{slug}"
        mode, epsilon = change.shift
        doctored = doctor_covariances(base_covariance, mode, epsilon)
        write_factors(run.analyzer.factors_output_dir(doctored_name), doctored, run.factor_args)
        run.artifacts["covariance"] = doctored
        run.covariance_shift = change.description
        covariance_from = doctored_name
        run.factors_name = f"{base_factors}__{slug}"
        first = "eigendecomposition"
    elif first in ("covariance", "eigendecomposition", "lambda"):
        if first == "covariance":
            run.covariance_shift = None
        else:
            covariance_from, first = run.factors_name, "eigendecomposition"
        run.factors_name = f"{base_factors.split('__')[0]}__{slug}"
    else:
        run.scores_tag = f"__{slug}"
    run.scores_tag = run.scores_tag if first in ("pairwise_scores", "self_scores") else ""
    run_influence_stages(run, progress, first_stage=first, load_covariance_from=covariance_from, on_stage_done=examine)
    # Stages before `first` kept their results, but their checks may read the changed arguments.
    reexamine(run, [name for name in STAGES[1:] if STAGES.index(name) < STAGES.index(first)], thresholds)


def snapshot(run: Run, label: str) -> Snapshot:
    import torch

    from influence_doctor.report.scores import total_scores

    scores = {
        kind: total_scores(run.artifacts[stage]).detach().clone()
        for kind, stage in (("pairwise", "pairwise_scores"), ("self", "self_scores"))
        if run.artifacts.get(stage) and run.stages[stage].completed
    }
    finite = bool(scores) and all(bool(torch.isfinite(tensor).all()) for tensor in scores.values())
    regularization = {
        "damping_factor": run.score_args.damping_factor,
        "covariance_shift": run.covariance_shift,
        "strategy": run.factor_args.strategy,
    }
    return Snapshot(label, scores, finite, regularization)


def _plain(value: Any) -> Any:
    import torch

    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return value
