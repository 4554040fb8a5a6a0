"""`diagnose`: run a pipeline instrumented, examine every stage, find root causes, heal, report."""

from __future__ import annotations

import copy
import gc
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from influence_doctor import distributed
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.diagnosis import Problem
from influence_doctor.diagnosis.differential import PROBE_QUERIES, Labs, differential_diagnosis
from influence_doctor.exact import exact_fidelity
from influence_doctor.examine import examine_stage
from influence_doctor.fidelity import fix_fidelity
from influence_doctor.findings import Finding
from influence_doctor.pipeline import Pipeline
from influence_doctor.prescription import prescribe
from influence_doctor.probes import run_probes
from influence_doctor.progress import StageProgress
from influence_doctor.projection import project
from influence_doctor.projection.rehearsal import choose_rehearsal
from influence_doctor.remedies.heal import HealResult, Remedy, heal
from influence_doctor.report.atomic import write_tensors_atomic, write_text_atomic
from influence_doctor.report.document import build_report
from influence_doctor.report.html import render_html
from influence_doctor.report.strict_json import dumps, strict
from influence_doctor.report.text import render
from influence_doctor.runner import Run, RunOptions, create_run, run_influence_stages, run_train_stage
from influence_doctor.runner.stages import preflight_blocked, settle_status

DEFAULT_PROBE_EXAMPLES = 64
"""Size of the pilot that times the stages when the probes themselves are off."""

MIN_FIX_SPEARMAN = 0.9
"""A healed run whose rankings agree with the least-regularized finite run below this is flagged:
a fix must never be worse than the problem (the `min_fix_spearman` gate uses the same default)."""


@dataclass
class Report:
    """What `diagnose` returns: the verdict, the evidence, what was done, and where the files are."""

    status: str
    findings: list[Finding]
    problems: list[Problem]
    remedies: list[dict[str, Any]]
    prescription: dict[str, Any]
    document: dict[str, Any]
    run_dir: Path
    run: Run | None = field(default=None, repr=False)

    @property
    def json_path(self) -> Path:
        return self.run_dir / "report.json"


@dataclass
class _Treatment:
    """What the doctor did, kept current so an interrupted run still reports it."""

    initial_problems: list[Problem] = field(default_factory=list)
    problems: list[Problem] | None = None  # the latest diagnosis (None: not diagnosed yet)
    remedies: list[Remedy] = field(default_factory=list)
    result: HealResult | None = None
    original_factor_args: Any = None
    original_score_args: Any = None
    original_batch_size: int = 0
    exact: dict[str, Any] | None = None
    fix: dict[str, Any] | None = None  # the final configuration's rankings against its reference
    min_fix_spearman: float = MIN_FIX_SPEARMAN
    labs: Labs | None = None

    @property
    def applied(self) -> list[Remedy]:
        """Rungs that changed the run (an exhausted ladder, or a rung undone because it made the run worse,
        is on record but changed nothing)."""
        return [remedy for remedy in self.remedies if remedy.outcome not in ("exhausted", "rejected")]


def diagnose(
    pipeline: Pipeline,
    fix: bool = True,
    out_dir: str | Path = "reports",
    *,
    examples: int | str | None = "auto",
    queries: int | None = 16,
    device: str = "auto",
    seed: int | None = None,
    progress: bool = True,
    target: str | None = None,
    run_id: str | None = None,
    probe_examples: int = 64,
    thresholds: Thresholds | None = None,
    ladders: Mapping[str, list[str]] | None = None,
    min_fix_spearman: float = MIN_FIX_SPEARMAN,
    memory_budget: float | None = None,
    prior_seconds: float = 0.0,
) -> Report:
    """Run `pipeline` under the doctor and write reports/<pipeline>/<run-id>/report.{json,md}.

    `examples=None` analyses the full training set; an int, a seeded subsample of that size (the
    rehearsal); "auto", a subsample sized to a tenth of the projected full run (at least 256 examples).
    With `fix`, each treatable problem climbs its ladder one rung at a time until healed.
    A Ctrl-C still writes a partial report (marked so) before the KeyboardInterrupt propagates.
    `thresholds` and `ladders` override the defaults (the CLI reads both from pyproject.toml);
    `min_fix_spearman` is the fidelity below which a fix is flagged as worse than the problem;
    `memory_budget` (bytes) is what a stage may use at full size (default: the device's memory);
    `prior_seconds`, time this process spent before the call that a full run spends too (the command
    line's imports), which the rehearsal's time budget must cover as well.
    """
    started = time.perf_counter()
    world = distributed.current()
    progress = progress and world.is_writer  # under torchrun one progress display, rank 0's
    options = RunOptions(
        out_dir=Path(out_dir),
        examples=examples,
        queries=queries,
        device=device,
        seed=seed,
        progress=progress,
        run_id=run_id,
        fix=fix,
        probe_examples=probe_examples,
        memory_budget=memory_budget,
        prior_seconds=prior_seconds,
    )
    reporter = StageProgress(enabled=progress)
    run = create_run(pipeline, options, reporter)
    run.started = started
    treatment = _Treatment(
        original_factor_args=copy.deepcopy(pipeline.factor_args),
        original_score_args=copy.deepcopy(pipeline.score_args),
        original_batch_size=pipeline.batch_size,
        min_fix_spearman=min_fix_spearman,
    )
    with _cheap_garbage_collection():
        try:
            examine = lambda record: examine_stage(run, record, thresholds)  # noqa: E731
            run_train_stage(run, reporter, on_stage_done=examine)
            gc.freeze()  # the model, data and Analyzer are long-lived too: keep them out of every collection
            spent = options.prior_seconds + time.perf_counter() - started
            blocked = preflight_blocked(run)  # nothing is fitted: not the pilots, the stages or the probes
            probe = _size_rehearsal(run, reporter, spent) if options.examples == "auto" and not blocked else None
            run_influence_stages(run, reporter, on_stage_done=examine)
            labs = treatment.labs = Labs(
                run,
                0 if blocked else options.probe_examples,
                thresholds,
                note=reporter.note,
                probe=probe if options.probe_examples else None,
            )
            if labs.enabled:
                reporter.note(f"probing precision and damping on {labs.probe.examples} examples")
                run.probes = run_probes(run, labs, thresholds)
            treatment.problems = treatment.initial_problems = differential_diagnosis(run, labs, thresholds)
            if fix and any(problem.treatable for problem in treatment.initial_problems):
                treatment.result = heal(
                    run,
                    treatment.initial_problems,
                    labs,
                    reporter,
                    thresholds,
                    ladders,
                    on_rung=treatment.remedies.append,
                    min_fix_spearman=min_fix_spearman,
                )
                treatment.problems = treatment.result.problems
                if treatment.remedies and labs.enabled:
                    reporter.note("probing the healed configuration")
                    run.probes = {"initial": run.probes, "final": run_probes(run, labs, thresholds)}
                    treatment.problems = differential_diagnosis(run, labs, thresholds)
                if treatment.applied:
                    reporter.note("measuring what the fix cost against its reference")
                    treatment.fix = _fix_fidelity(run, labs, treatment)
                    reporter.note("measuring fidelity against exact influence")
                    treatment.exact = exact_fidelity(run)
        except BaseException:  # Ctrl-C, or a failure outside any stage: still leave a partial report
            if run.interrupted_in is None:  # stopped between stages: in the probes or the remedies
                run.interrupted_in = f"remedy {len(treatment.remedies) + 1}" if treatment.initial_problems else "checks"
            _write(run, target, treatment, synchronise=False)  # other ranks may not be here: no collectives
            reporter.note(f"stopped: partial report written to {run.run_dir / 'report.json'}")
            raise
        else:
            return _write(run, target, treatment)
        finally:
            if run.private_analysis_dir is not None:
                shutil.rmtree(run.private_analysis_dir, ignore_errors=True)


def write_final_scores(run: Run) -> None:
    """The final configuration's scores (summed over modules) as scores.safetensors beside the report."""
    from influence_doctor.checks.scores import total_scores
    from influence_doctor.report.document import SCORE_STAGES, SCORES_FILE

    tensors = {
        kind: total_scores(run.artifacts[stage]).detach().cpu().contiguous()
        for kind, stage in SCORE_STAGES.items()
        if run.artifacts.get(stage) and run.stages[stage].completed
    }
    if tensors:
        write_tensors_atomic(run.run_dir / SCORES_FILE, tensors)


@contextmanager
def _cheap_garbage_collection() -> Iterator[None]:
    """kronfluence calls gc.collect() around every stage and partition; with torch loaded each call
    walks hundreds of thousands of long-lived objects. Freezing them for the run makes it cheap."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _size_rehearsal(run: Run, reporter: StageProgress, spent_seconds: float) -> Any:
    """Size the rehearsal by a share of the projected full run (timed on two pilots); returns the probe
    pilot's Lab so its trials serve the probes too. `spent_seconds` (imports, building and training the
    model) is paid by the rehearsal and the full run alike."""
    if run.analyzer is None or run.train_subset is None:
        return None
    reporter.note("timing two small pilots to size the rehearsal")
    probe_examples = run.options.probe_examples or DEFAULT_PROBE_EXAMPLES
    plan, probe = choose_rehearsal(run, probe_examples, PROBE_QUERIES, spent_seconds=spent_seconds)
    run.rehearsal_plan = plan.to_dict()
    reporter.note(f"rehearsing on {plan.examples} of {run.train_examples_total} examples: {plan.reason}")
    return probe


def _final_float64_agreement(probes: dict[str, Any]) -> dict[str, Any]:
    """How the final configuration's scores compare with float64 at the same damping, on the probe:
    the fidelity of a fix that changed only precision, which no less-regularized run can measure."""
    precision = (probes.get("final") or probes).get("precision") or {}
    return {
        kind: {key: precision[kind][key] for key in ("median_spearman", "worst_spearman", "top_overlap")}
        for kind in ("pairwise", "self")
        if isinstance(precision.get(kind), dict)
    }


def _fix_fidelity(run: Run, labs: Labs, treatment: _Treatment) -> dict[str, Any]:
    """The final configuration against the least-regularized trusted run, else float64 as configured
    (computed on the probe only in that case)."""
    result = treatment.result
    pair = None
    if not any(snapshot.trusted for snapshot in result.snapshots[:-1]):
        summed = run.summed_task
        reference = labs.reference(summed)
        final = labs.candidate(run.factor_args, run.score_args, run.shift, summed)
        pair = (final, reference) if reference is not None and final is not None else None
    return fix_fidelity(result.snapshots, treatment.min_fix_spearman, pair, tuple(run.pipeline.scores))


def _advice(treatment: _Treatment) -> list[dict[str, Any]]:
    """The best option the fidelity bar rejected, per cause left untreated, with its measured cost."""
    result = treatment.result
    if result is None:
        return []
    advice = []
    for option in result.advice:
        change = option["change"]
        settings = prescribe(
            treatment.original_factor_args, treatment.original_score_args, change.factor_args, change.score_args
        )
        fidelity = option["fidelity"]
        advice.append(
            {
                "cause": option["cause"],
                "rung": option["rung"],
                "change": change.description,
                "factor_args": settings["factor_args"],
                "score_args": settings["score_args"],
                "python": settings["python"],
                "method_changed": change.method_changed,
                "fidelity": {key: fidelity.get(key) for key in FIDELITY_KEYS},
                "reason": f"not applied: its rankings fall below min_fix_spearman {treatment.min_fix_spearman:g}",
            }
        )
    return advice


TASK_PRESCRIPTION = (
    'in your Task, return the sum over examples (e.g. F.cross_entropy(logits, labels, reduction="sum")): '
    "the doctor multiplied each batch's mean by its size"
)

FIDELITY_KEYS = ("reference", "median_spearman", "worst_spearman", "top_overlap", "examples", "queries")


def _flag_costly_fix(run: Run, fix: dict[str, Any]) -> None:
    """A fix that moved the rankings further than `min_fix_spearman` allows is worse than the problem
    it healed, or close to it: a `warn` on the score stage, which the gate of that name fails."""
    if not fix.get("below_limit"):
        return
    stage = next((name for name in ("pairwise_scores", "self_scores") if run.stages[name].completed), None)
    if stage is None:
        return
    run.stages[stage].findings.append(
        Finding(
            check="scores.fix_fidelity",
            stage=stage,
            subject="",
            severity="warn",
            value=fix["median_spearman"],
            limit=fix["limit"],
            cause=None,
            message=f"The fix moved the rankings to median per-query Spearman {fix['median_spearman']:.3f} "
            f"against {fix['reference']!r}, below {fix['limit']:g}: a fix worse than the problem is no cure.",
        )
    )
    settle_status(run.stages[stage])


def _probe_scores(labs: Labs | None) -> dict[str, tuple[Any, Any]] | None:
    """(configured, float64) scores on the probe, already computed by the precision probe: the
    fidelity figure of a run no remedy touched."""
    if labs is None or not labs.enabled or labs.probe is None:
        return None
    configured, reference = labs.probe.measured()
    if configured is None or reference is None:
        return None
    return {kind: (configured.scores(kind), reference.scores(kind)) for kind in ("pairwise", "self")}


def _distributed_summary(run: Run) -> dict[str, Any]:
    """How the ranks shared the work, and whether they measured the same numbers in every stage."""
    disagreeing = sorted(
        name for name, record in run.stages.items() if not (record.metrics.get("ranks") or {}).get("agree", True)
    )
    return {
        "kronfluence_distributes": distributed.kronfluence_distributes(),
        "ranks_agree": not disagreeing,
        "stages_where_ranks_disagree": disagreeing,
    }


def _write(run: Run, target: str | None, treatment: _Treatment, synchronise: bool = True) -> Report:
    """Build the report; rank 0 alone writes it (every rank returns it, with rank 0's verdict)."""
    problems = treatment.problems if treatment.problems is not None else []
    broken = any(record.status in ("error", "fail", "interrupted") for record in run.stages.values())
    costly = treatment.fix is not None and bool(treatment.fix.get("below_limit"))
    if problems or broken or costly:
        status = "sick"
    elif treatment.applied:
        status = "healed"
    else:
        status = "healthy"
    if synchronise:
        status = distributed.decide(status)
    prescription: dict[str, Any] = {}
    fidelity: dict[str, Any] = {"probes": run.probes}
    if float64 := _final_float64_agreement(run.probes):
        fidelity["float64"] = float64
    if treatment.applied:
        batch = run.train_batch_size
        prescription = prescribe(
            treatment.original_factor_args,
            treatment.original_score_args,
            run.factor_args,
            run.score_args,
            None if batch == treatment.original_batch_size else (treatment.original_batch_size, batch),
        )
        if run.summed_task:
            prescription["task"] = TASK_PRESCRIPTION
            prescription["python"] = f"{prescription['python']}\n# {TASK_PRESCRIPTION}".lstrip("\n")
        if treatment.fix is not None:
            fidelity["fix"] = treatment.fix
            _flag_costly_fix(run, fidelity["fix"])
        if treatment.exact is not None:
            fidelity["exact"] = treatment.exact
    if advice := _advice(treatment):
        prescription["advice"] = advice
    rehearsal = run.options.examples is not None and len(run.train_indices) < run.train_examples_total
    document = strict(
        build_report(
            run,
            status,
            target,
            problems,
            initial_problems=treatment.initial_problems + (treatment.result.revealed if treatment.result else []),
            remedies=[remedy.to_dict() for remedy in treatment.remedies],
            prescription=prescription,
            fidelity=fidelity,
            projection=project(run, treatment.labs, run.options.memory_budget) if rehearsal else {},
        )
    )
    if (world := distributed.current()).distributed:
        document["environment"]["distributed"] = _distributed_summary(run)
    if world.is_writer:
        write_text_atomic(run.run_dir / "report.json", dumps(document, already_strict=True))
        write_final_scores(run)
        write_text_atomic(run.run_dir / "report.md", render(document, markdown=True))
        snapshots = treatment.result.snapshots if treatment.result is not None else None
        page = render_html(document, run, snapshots, _probe_scores(treatment.labs))
        write_text_atomic(run.run_dir / "report.html", page)
    findings = [finding for record in run.stages.values() for finding in record.findings]
    return Report(
        status=status,
        findings=findings,
        problems=problems,
        remedies=document["remedies"],
        prescription=document["prescription"],
        document=document,
        run_dir=run.run_dir,
        run=run,
    )
