"""The healing loop: one rung at a time, re-run only what it invalidates, re-check, stop when healed.

Each rung is a change of the run's current configuration (the dtype and damping ladders supersede their
own earlier rungs; a diagonal shift replaces an earlier one, computed from the same undoctored
covariances); the executor re-runs only the stages from the first one the change invalidates. Every
rung tried is recorded with what it changed, the stages it re-ran, the kronfluence calls and the outcome.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from influence_doctor import distributed
from influence_doctor.causes import cause, ladder_for
from influence_doctor.changes import Change, Facts, plan
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.diagnosis import Problem
from influence_doctor.diagnosis.differential import differential_diagnosis, judge_change
from influence_doctor.diagnosis.problem import stage_views
from influence_doctor.diagnosis.symptoms import find_symptoms
from influence_doctor.examine import Examiner
from influence_doctor.fidelity import FLOAT64_REFERENCE, Snapshot, below, rankings_against, snapshot
from influence_doctor.labs import Labs
from influence_doctor.pipeline import FACTOR_STAGES, INFLUENCE_STAGES, STAGES
from influence_doctor.probes import measure_probes
from influence_doctor.progress import StageProgress
from influence_doctor.runner.run import Run

MAX_RUNGS = 12
"""Rungs tried before the doctor gives up: every ladder is shorter, so this only stops pathologies
that trade one problem for another forever."""


@dataclass
class Remedy:
    cause: str | None
    rung: str
    change: str
    changes: dict[str, tuple[Any, Any]]
    first_stage: str
    stages_rerun: list[str]
    calls: list[str]
    outcome: str  # "healed" | "resolved" (this cause gone, others left) | "not-resolved" | "rejected" (made
    # the run worse once applied: undone) | "error" | "exhausted"
    seconds: float
    problems_after: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)  # rungs that could not act, and why
    error: str | None = None  # what stopped the rung, when its outcome is "error"
    rehearsal: dict[str, Any] | None = None  # where it was tried first and what it did there
    revealed: list[str] = field(default_factory=list)  # problems it uncovered in stages that could not run before
    method_changed: bool = False  # a strategy change: the scores approximate another quantity

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
            "rehearsal": _plain_tree(self.rehearsal),
            "revealed": self.revealed,
            "method_changed": self.method_changed,
        }


@dataclass
class HealResult:
    remedies: list[Remedy]
    problems: list[Problem]
    snapshots: list[Snapshot]
    exhausted: list[str]  # problems ("cause at stage") whose ladder ran out
    advice: list[dict[str, Any]] = field(default_factory=list)  # per exhausted cause, the best rung the bar rejected
    revealed: list[Problem] = field(default_factory=list)  # problems uncovered by a rung, diagnosed on top
    probes: Any = None  # the last probes taken, of the configuration the treatment ended with


def heal(
    run: Run,
    problems: list[Problem],
    labs: Labs,
    examiner: Examiner,
    progress: StageProgress,
    thresholds: Thresholds | None = None,
    ladders: Mapping[str, list[str]] | None = None,
    on_rung: Callable[[Remedy], None] | None = None,
    min_fix_spearman: float = 0.9,
) -> HealResult:
    """Climb the ladders of the treatable problems until none is left or the ladders run out.

    Each rung is rehearsed where its problem reproduced (the probe subsample, or the whole rehearsal)
    and applied to the run only when it heals the problem there without breaking a measurement that
    passed before it, and when its rankings on the probe agree with float64 of the configuration as given
    at `min_fix_spearman` or better. A rung that heals its problem and reveals another (in a stage that
    could not run before) is kept; the revealed problem is diagnosed and treated on top. Rungs skipped
    or rejected on the way are recorded with the reason; the best one the bar rejected is kept as advice.
    """
    thresholds = thresholds or Thresholds()
    remedies: list[Remedy] = []
    snapshots = [snapshot(run, "as configured")]
    tried: dict[tuple[str | None, str, str | None], set[str]] = {}  # per problem: cause, stage, setting
    exhausted: list[str] = []
    advice: list[dict[str, Any]] = []
    revealed_problems: list[Problem] = []
    latest_probes = None
    while len(remedies) < MAX_RUNGS:
        treatable = [p for p in problems if p.treatable and _label(p) not in exhausted]
        if not treatable:
            break
        problems_before = list(problems)
        problem = treatable[0]
        change, rehearsal, skipped, rejected = distributed.decide(  # under torchrun: rank 0 picks the rung
            _next_change(
                problem,
                run,
                labs,
                tried.setdefault((problem.cause, problem.stage, problem.setting), set()),
                ladders,
                thresholds,
                progress,
                min_fix_spearman,
            )
        )
        if change is None:
            exhausted.append(_label(problem))
            progress.note(f"no rung left for {problem.cause or 'an unexplained failure'}")
            if rejected:
                advice.append(max(rejected, key=lambda option: option["fidelity"]["median_spearman"]))
            if skipped:
                remedies.append(_exhausted(problem, skipped))
                if on_rung is not None:
                    on_rung(remedies[-1])
            continue
        progress.note(f"remedy {len(remedies) + 1}: {problem.cause} → {change.rung} ({change.description})")
        started = time.perf_counter()
        index = len(remedies) + 1
        saved = _Saved(run)
        outcome, error = "not-resolved", None
        try:
            latest_probes = _apply(run, change, labs, examiner, thresholds)
        except Exception as exc:  # writing doctored files can fail (disk full): record, stop climbing
            outcome, error = "error", f"{type(exc).__name__}: {exc}"
            progress.note(f"remedy failed: {error}")
            saved.restore(run)
            latest_probes = _reexamine(run, labs, examiner, thresholds)
        outcome, error = distributed.decide((outcome, error))
        rerun = [name for name in INFLUENCE_STAGES if STAGES.index(name) >= STAGES.index(change.first_stage)]
        rerun = rerun if outcome != "error" else []
        problems = differential_diagnosis(run, labs, thresholds)
        broken = _broken_on_the_run(saved.symptoms, run) if outcome != "error" else []
        if broken:  # worse than before where it counts: undo it, keep the record, climb on
            outcome, error = "rejected", f"applied, it broke {', '.join(broken)}, which passed before: undone"
            progress.note(f"remedy {index} {error}")
            saved.restore(run)
            latest_probes = _reexamine(run, labs, examiner, thresholds)
            problems = differential_diagnosis(run, labs, thresholds)
        causes_after = [p.cause or "unexplained" for p in problems]
        uncovered = [p for p in problems if not _known(p, problems_before)] if outcome != "rejected" else []
        for found in uncovered:
            found.revealed_by = change.rung
        revealed_problems.extend(uncovered)
        revealed = [_label(p) for p in uncovered]
        if outcome not in ("error", "rejected"):
            gone = _label(problem) not in {_label(p) for p in problems}
            outcome = "healed" if not problems else "resolved" if gone else "not-resolved"
        remedy = Remedy(
            cause=problem.cause,
            rung=change.rung,
            change=change.description,
            changes=change.changes,
            first_stage=change.first_stage,
            stages_rerun=rerun,
            calls=[call for name in rerun for call in saved.calls_after(run, name)],
            outcome=outcome,
            seconds=time.perf_counter() - started,
            problems_after=causes_after,
            skipped=skipped,
            error=error,
            rehearsal=rehearsal,
            revealed=revealed,
            method_changed=change.method_changed,
        )
        remedies.append(remedy)
        if outcome != "rejected":
            snapshots.append(snapshot(run, f"after {change.rung}"))
        if on_rung is not None:
            on_rung(remedy)
        if outcome == "error":
            break
    return HealResult(remedies, problems, snapshots, exhausted, advice, revealed_problems, latest_probes)


class _Saved:
    """The run as it was before a rung, to undo a rung that made it worse: its configuration and its
    trial (kronfluence's files of every configuration live under their own names, so nothing is lost),
    and the symptoms it showed."""

    def __init__(self, run: Run) -> None:
        self.configuration = run.configuration
        self.trial = run.trial
        self.symptoms = {(s.kind, s.stage) for s in find_symptoms(stage_views(run))}

    def restore(self, run: Run) -> None:
        run.configuration = self.configuration
        run.trial = self.trial

    @staticmethod
    def calls_after(run: Run, stage: str) -> list[str]:
        """The kronfluence calls the stage made in the run's trial after the rung."""
        result = run.trial.stages.get(stage) if run.trial is not None else None
        return list(result.calls) if result is not None and result.status in ("ok", "error") else []


def _broken_on_the_run(symptoms_before: set[tuple[str, str]], run: Run) -> list[str]:
    """Symptoms the run shows after a rung in stages that were computed and right before it (nothing
    wrong in them or in a factor stage feeding them): the rung made the run worse there."""
    before_stages = {stage for _kind, stage in symptoms_before}
    broken = []
    for symptom in find_symptoms(stage_views(run)):
        if (symptom.kind, symptom.stage) in symptoms_before or symptom.stage == "train":
            continue
        feeding = {name for name in FACTOR_STAGES if STAGES.index(name) < STAGES.index(symptom.stage)}
        if not (feeding | {symptom.stage}) & before_stages:
            broken.append(f"{symptom.stage} ({symptom.kind})")
    return broken


def _exhausted(problem: Problem, skipped: list[dict[str, str]]) -> Remedy:
    """A ladder that ran out: no rung applied, but every rung considered is on record with its reason."""
    return Remedy(
        cause=problem.cause,
        rung="(none)",
        change="no rung of the ladder heals it",
        changes={},
        first_stage=problem.stage,
        stages_rerun=[],
        calls=[],
        outcome="exhausted",
        seconds=0.0,
        problems_after=[],
        skipped=skipped,
    )


def _next_change(
    problem: Problem,
    run: Run,
    labs: Labs,
    tried: set[str],
    ladders: Mapping[str, list[str]] | None,
    thresholds: Thresholds,
    progress: StageProgress,
    min_fix_spearman: float,
) -> tuple[Change | None, dict[str, Any] | None, list[dict[str, str]], list[dict[str, Any]]]:
    """The next rung that plans a change and, rehearsed where the problem reproduced, heals it without
    falling below the fidelity bar; also the rungs the bar alone rejected, with their measured cost."""
    facts = Facts.measured(run.configuration, run.artifacts, tuple(run.pipeline.scores))
    skipped: list[dict[str, str]] = []
    rejected: list[dict[str, Any]] = []
    for rung in ladder_for(problem.cause, ladders):
        if rung in tried:
            continue
        tried.add(rung)
        change, reason = plan(rung, problem, run.configuration, facts)
        if change is None:
            skipped.append({"rung": rung, "reason": reason})
            continue
        if change.module_damping is not None:
            skipped.append({"rung": rung, "reason": "a per-module damping is an experiment: kronfluence takes one"})
            continue
        lab = labs.named(problem.lab)
        if lab is None and change.summed_task and labs.enabled:
            lab = labs.probe  # the Task's contract is the run's own; its effect shows on any subsample
        row = cause(problem.cause)
        memory = change.batch_size is not None or (row is not None and not row.rehearsable)
        if lab is None or memory or not problem.symptoms:
            why = (
                "memory depends on the full size, not a subsample"
                if memory
                else "the probes are off"
                if not labs.enabled
                else "no subsample reproduced it"
            )
            return change, {"rehearsed": False, "reason": why}, skipped, rejected
        progress.note(f"rehearsing {rung} on {lab.examples} examples")
        base = lab.configured()
        trial = lab.trial(change.after, label=rung)
        verdict = judge_change(problem, base, trial, lab, thresholds)
        rehearsal = {
            "rehearsed": True,
            "lab": lab.name,
            "examples": lab.examples,
            "queries": lab.queries,
            "before": verdict.before,
            "after": verdict.after,
            "heals": verdict.heals,
            "seconds": trial.seconds,
            "revealed": [f"{stage} ({kind})" for kind, stage in verdict.revealed],
        }
        if not verdict.heals:
            skipped.append(
                {"rung": rung, "reason": f"rehearsed on {lab.examples} examples, did not heal: {verdict.reason}"}
            )
            continue
        fidelity = _fidelity_on_probe(labs, change)
        rehearsal["fidelity"] = fidelity
        if fidelity is not None and below(fidelity, min_fix_spearman):
            if verdict.revealed:  # the low rankings may be the revealed problem's: held to the bar once treated
                rehearsal["fidelity_note"] = "it revealed another problem; the composed fix is held to the bar"
                return change, rehearsal, skipped, rejected
            cost = _cost_text(fidelity)
            skipped.append({"rung": rung, "reason": f"heals, but {cost}, below min_fix_spearman {min_fix_spearman:g}"})
            rejected.append({"rung": rung, "cause": problem.cause, "change": change, "fidelity": fidelity})
            continue
        return change, rehearsal, skipped, rejected
    return None, None, skipped, rejected


def _fidelity_on_probe(labs: Labs, change: Change) -> dict[str, Any] | None:
    """The rung's rankings against float64 of the configuration as given, on the probe."""
    reference = labs.reference(change.after)
    candidate = labs.candidate(change.after)
    if reference is None or candidate is None:
        return None
    return rankings_against(candidate, reference, tuple(labs.run.pipeline.scores), FLOAT64_REFERENCE)


def _cost_text(fidelity: dict[str, Any]) -> str:
    return (
        f"its rankings agree with {fidelity['reference']} at median per-query Spearman "
        f"{fidelity['median_spearman']:.3f} (worst {fidelity['worst_spearman']:.3f}, "
        f"{fidelity['examples']} examples × {fidelity['queries']} queries)"
    )


def _label(problem: Problem) -> str:
    """One problem as a person names it: a cause where it starts. Two problems of one cause at two
    stages (an overflow in the covariance, then one in Λ) climb their own ladders."""
    return f"{problem.cause or 'unexplained'} at {problem.stage}"


def _known(problem: Problem, before: list[Problem]) -> bool:
    """Whether `problem` was already diagnosed before the rung (same cause at the same stage)."""
    return any((p.cause, p.stage) == (problem.cause, problem.stage) for p in before)


def _apply(run: Run, change: Change, labs: Labs, examiner: Examiner, thresholds: Thresholds | None) -> Any:
    """Make the change's configuration the run's: the executor re-runs the stages from the first one it
    invalidates (the earlier ones are shared), then the probes and the checks see the new configuration."""
    run.configuration = change.after
    run.trial = run.executor.trial(
        change.after, run.rehearsal, label=change.rung, announce=True, verdict=examiner.verdict
    )
    return _reexamine(run, labs, examiner, thresholds)


def _reexamine(run: Run, labs: Labs, examiner: Examiner, thresholds: Thresholds | None) -> Any:
    """The run's verdicts under its current configuration: the probes again (precision, headroom), then
    the checks on everything; returns what the probes measured."""
    examiner.examine()
    probes = measure_probes(run, labs, thresholds, damping=False)
    examiner.examine(probes)
    return probes


def _plain(value: Any) -> Any:
    import torch

    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return value


def _plain_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain_tree(inner) for key, inner in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_tree(inner) for inner in value]
    return _plain(value)


@dataclass
class Treatment:
    """What the doctor did, kept current so an interrupted run still reports it."""

    initial_problems: list[Problem] = field(default_factory=list)
    problems: list[Problem] | None = None  # the latest diagnosis (None: not diagnosed yet)
    remedies: list[Remedy] = field(default_factory=list)
    result: HealResult | None = None
    exact: dict[str, Any] | None = None
    fix: dict[str, Any] | None = None  # the final configuration's rankings against its reference
    min_fix_spearman: float = 0.9  # the bar a fix is held to (`min_fix_spearman`)
    labs: Labs | None = None
    probes: Any = None  # the latest probes' measurements (`probes.Probes`)

    @property
    def applied(self) -> list[Remedy]:
        """Rungs that changed the run (an exhausted ladder, or a rung undone because it made the run worse,
        is on record but changed nothing)."""
        return [remedy for remedy in self.remedies if remedy.outcome not in ("exhausted", "rejected")]
