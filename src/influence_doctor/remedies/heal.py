"""The healing loop: one rung at a time, re-run only what it invalidates, re-check, stop when healed.

Each rung applies on top of the current configuration (the dtype and damping ladders supersede their
own earlier rungs); a diagonal shift always starts from the last undoctored covariances. Every rung
tried is recorded with what it changed, the stages it re-ran, the kronfluence calls and the outcome.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from influence_doctor import distributed
from influence_doctor.causes import cause, ladder_for
from influence_doctor.changes import Change, Settings, plan
from influence_doctor.checks.spectra import damping_reference_points
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.diagnosis import Problem
from influence_doctor.diagnosis.differential import Labs, differential_diagnosis, judge_change
from influence_doctor.diagnosis.problem import stage_views
from influence_doctor.diagnosis.symptoms import find_symptoms
from influence_doctor.examine import examine_stage, reexamine
from influence_doctor.fidelity import FLOAT64_REFERENCE, below, rankings_against
from influence_doctor.lab import FACTOR_STAGES
from influence_doctor.pipeline import STAGES
from influence_doctor.probes import run_probes
from influence_doctor.progress import StageProgress
from influence_doctor.remedies.doctored import doctor_covariances, write_factors
from influence_doctor.runner.run import Run
from influence_doctor.runner.stages import measure_contract_of, run_influence_stages

MAX_RUNGS = 12
"""Rungs tried before the doctor gives up: every ladder is shorter, so this only stops pathologies
that trade one problem for another forever."""


@dataclass
class Snapshot:
    """Scores of one configuration, for the fidelity comparison."""

    label: str
    scores: dict[str, Any]
    trusted: bool  # every score finite, and no measurement showed them or the factors behind them wrong
    regularization: dict[str, Any]
    spectra: dict[str, Any] = field(default_factory=dict)  # module → report.charts.Spectrum, for the plots


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


def heal(
    run: Run,
    problems: list[Problem],
    labs: Labs,
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
    base_covariance = run.artifacts.get("covariance")
    base_factors = run.factors_name
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
        before = {name: id(record) for name, record in run.stages.items()}
        saved = _Saved(run, base_covariance, base_factors)
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
        outcome, error = distributed.decide((outcome, error))
        rerun = [name for name in STAGES if id(run.stages[name]) != before[name]]
        labs.refresh()
        run_probes(run, labs, thresholds, damping=False)
        problems = differential_diagnosis(run, labs, thresholds)
        broken = _broken_on_the_run(saved.symptoms, run) if outcome != "error" else []
        if broken:  # worse than before where it counts: undo it, keep the record, climb on
            outcome, error = "rejected", f"applied, it broke {', '.join(broken)}, which passed before: undone"
            progress.note(f"remedy {index} {error}")
            base_covariance, base_factors = saved.restore(run)
            labs.refresh()
            run_probes(run, labs, thresholds, damping=False)
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
            calls=[call for name in rerun for call in run.stages[name].calls],
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
    return HealResult(remedies, problems, snapshots, exhausted, advice, revealed_problems)


class _Saved:
    """The run as it was before a rung, to undo a rung that made it worse: its configuration, stage
    records and artifacts (kronfluence's files of each rung live under their own names, so the earlier
    ones are still there), and the symptoms it showed."""

    def __init__(self, run: Run, base_covariance: dict[str, Any] | None, base_factors: str) -> None:
        self.configuration = run.configuration
        # copies: re-checking the stages a rung does not re-run edits their records in place
        self.stages = {
            name: replace(record, findings=list(record.findings), metrics=dict(record.metrics))
            for name, record in run.stages.items()
        }
        self.artifacts = dict(run.artifacts)
        self.base = (base_covariance, base_factors)
        self.symptoms = {(s.kind, s.stage) for s in find_symptoms(stage_views(run))}
        self.completed = {name for name, record in run.stages.items() if record.completed}

    def restore(self, run: Run) -> tuple[dict[str, Any] | None, str]:
        run.configuration = self.configuration
        run.stages = dict(self.stages)
        run.artifacts = dict(self.artifacts)
        return self.base


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
    heuristic, floor = damping_reference_points(
        run.artifacts, run.factor_args.strategy, run.score_args.precondition_dtype
    )
    settings = Settings(
        factor_args=run.factor_args,
        score_args=run.score_args,
        batch_size=run.train_batch_size,
        score_stage="pairwise_scores" if "pairwise" in run.pipeline.scores else "self_scores",
        heuristic_damping=heuristic,
        damping_floor=floor,
        summed_task=run.summed_task,
    )
    skipped: list[dict[str, str]] = []
    rejected: list[dict[str, Any]] = []
    for rung in ladder_for(problem.cause, ladders):
        if rung in tried:
            continue
        tried.add(rung)
        change, reason = plan(rung, problem, settings)
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
        # The rung's own shift, or the one the run carries unless the rung recomputes the covariances.
        shift = change.shift or (run.shift if change.first_stage != "covariance" else None)
        summed = run.summed_task if change.summed_task is None else change.summed_task
        trial = lab.trial(change.factor_args, change.score_args, label=rung, shift=shift, summed_task=summed)
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
        fidelity = _fidelity_on_probe(labs, change, shift)
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


def _fidelity_on_probe(labs: Labs, change: Change, shift: tuple[str, float] | None) -> dict[str, Any] | None:
    """The rung's rankings against float64 of the configuration as given, on the probe."""
    summed = labs.run.summed_task if change.summed_task is None else change.summed_task
    reference = labs.reference(summed)
    candidate = labs.candidate(change.factor_args, change.score_args, shift, summed)
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


def _apply(
    run: Run,
    change: Change,
    index: int,
    base_factors: str,
    base_covariance: dict[str, Any] | None,
    progress: StageProgress,
    thresholds: Thresholds | None,
) -> None:
    """Replace the run's configuration with the change's, re-run from the first invalidated stage, then
    re-check the stages before it (their checks may read the changed arguments)."""
    slug = f"r{index}"
    first = change.first_stage
    covariance_from = None
    updates: dict[str, Any] = {"factor_args": change.factor_args, "score_args": change.score_args, "scores_tag": ""}
    if change.batch_size is not None:
        updates["batch_size"] = change.batch_size
    if change.summed_task is not None:
        updates["summed_task"] = change.summed_task
    if change.shift is not None:
        if base_covariance is None:
            raise RuntimeError("no covariance to shift")
        doctored_name = f"{base_factors}__doctored_{slug}"
        doctored = doctor_covariances(base_covariance, *change.shift)
        write_factors(run.analyzer.factors_output_dir(doctored_name), doctored, change.factor_args)
        run.artifacts["covariance"] = doctored
        updates.update(covariance_shift=change.description, shift=change.shift, factors_name=f"{base_factors}__{slug}")
        covariance_from, first = doctored_name, "eigendecomposition"
    elif first in ("covariance", "eigendecomposition", "lambda"):
        if first == "covariance":  # fresh covariances: the shift they carried is gone with them
            updates.update(covariance_shift=None, shift=None)
        else:
            covariance_from, first = run.factors_name, "eigendecomposition"
        updates["factors_name"] = f"{base_factors.split('__')[0]}__{slug}"
    else:
        updates["scores_tag"] = f"__{slug}"
    run.configuration = replace(run.configuration, **updates)
    examine = lambda record: examine_stage(run, record, thresholds)  # noqa: E731
    run_influence_stages(run, progress, first_stage=first, load_covariance_from=covariance_from, on_stage_done=examine)
    earlier = [name for name in STAGES[1:] if STAGES.index(name) < STAGES.index(first)]
    if change.summed_task is not None:  # the Task itself changed: its contract is measured again
        run.stages["train"].metrics["task_contract"] = measure_contract_of(run, run.summed_task)
        earlier = ["train", *earlier]
    reexamine(run, earlier, thresholds)


def snapshot(run: Run, label: str) -> Snapshot:
    import torch

    from influence_doctor.checks.scores import total_scores
    from influence_doctor.report.charts import spectra_of

    scores = {
        kind: total_scores(run.artifacts[stage]).detach().clone()
        for kind, stage in (("pairwise", "pairwise_scores"), ("self", "self_scores"))
        if run.artifacts.get(stage) and run.stages[stage].completed
    }
    finite = bool(scores) and all(bool(torch.isfinite(tensor).all()) for tensor in scores.values())
    # trustworthy: no measured wrong number in the scores or anything they were computed from (finite
    # scores from an overflowed covariance are garbage, however well they rank against float64 on a probe)
    measured_wrong = any(f.severity == "fail" for name in STAGES[1:] for f in run.stages[name].findings)
    regularization = {
        "damping_factor": run.score_args.damping_factor,
        "covariance_shift": run.covariance_shift,
        "strategy": run.factor_args.strategy,
    }
    return Snapshot(label, scores, finite and not measured_wrong, regularization, spectra_of(run))


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
