"""`diagnose`: run a pipeline instrumented, examine every stage, find root causes, heal, report.

The order of a diagnosis, and nothing else: the train stage (`runner.session`), the rehearsal's size
(`projection.rehearsal`), the run's stages (`runner.executor`), the checks (`examine`), the probes
(`probes`), the differential diagnosis (`diagnosis`), the treatment (`remedies.heal`), what the fix cost
(`fidelity`, `exact`) and the report (`report.write`).
"""

from __future__ import annotations

import gc
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from influence_doctor import distributed
from influence_doctor.audit.seed import measure_seed
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.configuration import Configuration
from influence_doctor.diagnosis import Problem
from influence_doctor.diagnosis.differential import differential_diagnosis
from influence_doctor.exact import exact_fidelity
from influence_doctor.examine import Examiner
from influence_doctor.fidelity import fix_fidelity
from influence_doctor.findings import Finding
from influence_doctor.labs import Labs
from influence_doctor.options import RunOptions
from influence_doctor.pipeline import Pipeline
from influence_doctor.probes import measure_probes
from influence_doctor.progress import StageProgress
from influence_doctor.projection.rehearsal import size_rehearsal
from influence_doctor.remedies.heal import Treatment, heal
from influence_doctor.report.write import write_report
from influence_doctor.runner.executor import Executor
from influence_doctor.runner.run import Run
from influence_doctor.runner.session import open_session, train

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
    """Run `pipeline` under the doctor and write reports/<pipeline>/<run-id>/report.{json,md,html}.

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
    reporter = StageProgress(enabled=progress and distributed.current().is_writer)  # under torchrun, rank 0's
    session = open_session(pipeline, options, reporter)
    asked = Configuration.of(pipeline)
    run = Run(session, Executor(session), asked=asked, configuration=asked, started=started)
    examiner = Examiner(run, thresholds)
    treatment = Treatment(min_fix_spearman=min_fix_spearman)
    with _cheap_garbage_collection():
        try:
            _treat(run, examiner, treatment, reporter, thresholds, ladders, options, fix)
        except BaseException:  # Ctrl-C, or a failure outside any stage: still leave a partial report
            if run.interrupted_in is None:  # stopped between stages: in the probes or the remedies
                run.stopped_in = f"remedy {len(treatment.remedies) + 1}" if treatment.initial_problems else "checks"
            write_report(run, target, treatment, examiner, synchronise=False)  # other ranks may not be here
            reporter.note(f"stopped: partial report written to {run.run_dir / 'report.json'}")
            raise
        else:
            status, document = write_report(run, target, treatment, examiner)
            return Report(
                status=status,
                findings=[finding for record in run.stages.values() for finding in record.findings],
                problems=treatment.problems if treatment.problems is not None else [],
                remedies=document["remedies"],
                prescription=document["prescription"],
                document=document,
                run_dir=run.run_dir,
                run=run,
            )
        finally:
            if session.private_analysis_dir is not None:
                shutil.rmtree(session.private_analysis_dir, ignore_errors=True)


def _treat(
    run: Run,
    examiner: Examiner,
    treatment: Treatment,
    reporter: StageProgress,
    thresholds: Thresholds | None,
    ladders: Mapping[str, list[str]] | None,
    options: RunOptions,
    fix: bool,
) -> None:
    """Train, size the rehearsal, run and check the stages, probe, diagnose, heal, and measure the fix."""
    session = run.session
    train(session, examiner.verdict)
    run.configuration = session.configuration_to_run(run.asked)
    examiner.examine()
    gc.freeze()  # the model, data and Analyzer are long-lived too: keep them out of every collection
    spent = options.prior_seconds + time.perf_counter() - (run.started or time.perf_counter())
    blocked = session.preflight_blocked  # nothing is fitted: not the pilots, the stages or the probes
    sized = options.examples == "auto" and not blocked and session.ready
    probe = size_rehearsal(run, reporter.note, spent) if sized else None
    run.rehearsal = run.executor.scope("rehearsal")
    run.trial = run.executor.trial(run.configuration, run.rehearsal, announce=True, verdict=examiner.verdict)
    examiner.examine()
    labs = treatment.labs = Labs(
        run,
        0 if blocked else options.probe_examples,
        note=reporter.note,
        probe=probe if options.probe_examples else None,
    )
    if labs.enabled:
        reporter.note(f"probing precision and damping on {labs.probe.examples} examples")
        treatment.probes = measure_probes(run, labs, thresholds)
        run.probes = treatment.probes.summary
        examiner.examine(treatment.probes)
    treatment.problems = treatment.initial_problems = differential_diagnosis(run, labs, thresholds)
    if fix and any(problem.treatable for problem in treatment.initial_problems):
        _heal(run, examiner, treatment, reporter, thresholds, ladders, labs)
    if labs.enabled and not treatment.problems:  # the rankings of what the user will run, one draw or many
        reporter.note("refitting the factors with a second sampling seed")
        bar = (thresholds or Thresholds()).precision.seed_min_spearman
        examiner.seed = measure_seed(run, labs, run.configuration, bar)


def _heal(
    run: Run,
    examiner: Examiner,
    treatment: Treatment,
    reporter: StageProgress,
    thresholds: Thresholds | None,
    ladders: Mapping[str, list[str]] | None,
    labs: Labs,
) -> None:
    """Climb the ladders, probe the healed configuration, and measure what the fix cost."""
    treatment.result = heal(
        run,
        treatment.initial_problems,
        labs,
        examiner,
        reporter,
        thresholds,
        ladders,
        on_rung=treatment.remedies.append,
        min_fix_spearman=treatment.min_fix_spearman,
    )
    treatment.problems = treatment.result.problems
    treatment.probes = treatment.result.probes or treatment.probes  # the last the treatment took, if any
    if treatment.remedies and labs.enabled:
        reporter.note("probing the healed configuration")
        treatment.probes = measure_probes(run, labs, thresholds)
        run.probes = {"initial": run.probes, "final": treatment.probes.summary}
        examiner.examine(treatment.probes)
        treatment.problems = differential_diagnosis(run, labs, thresholds)
    if treatment.applied:
        reporter.note("measuring what the fix cost against its reference")
        treatment.fix = _fix_fidelity(run, labs, treatment)
        reporter.note("measuring fidelity against exact influence")
        treatment.exact = exact_fidelity(run)


@contextmanager
def _cheap_garbage_collection() -> Iterator[None]:
    """kronfluence calls gc.collect() around every stage and partition; with torch loaded each call
    walks hundreds of thousands of long-lived objects. Freezing them for the run makes it cheap."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _fix_fidelity(run: Run, labs: Labs, treatment: Treatment) -> dict[str, Any]:
    """The final configuration against float64 of the configuration as given, on the probe; without a
    probe, against the least-regularized trusted run (said so)."""
    result = treatment.result
    reference = labs.reference(run.configuration)
    final = labs.candidate(run.configuration)
    pair = (final, reference) if reference is not None and final is not None else None
    return fix_fidelity(result.snapshots, treatment.min_fix_spearman, pair, tuple(run.pipeline.scores))
