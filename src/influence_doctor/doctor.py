"""`diagnose`: run a pipeline instrumented, examine every stage, and write the report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.diagnosis import Problem, diagnose_findings, stage_views
from influence_doctor.examine import examine_stage
from influence_doctor.findings import Finding
from influence_doctor.pipeline import Pipeline
from influence_doctor.probes import run_probes
from influence_doctor.progress import StageProgress
from influence_doctor.report.atomic import write_text_atomic
from influence_doctor.report.document import build_report
from influence_doctor.report.text import render
from influence_doctor.runner import Run, RunOptions, create_run, run_influence_stages, run_train_stage


@dataclass
class Report:
    """What `diagnose` returns: the verdict, the evidence and where the files are."""

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
    examples: int | None = 1024,
    queries: int | None = 16,
    device: str = "auto",
    seed: int | None = None,
    progress: bool = True,
    target: str | None = None,
    run_id: str | None = None,
    probe_examples: int = 64,
    thresholds: Thresholds | None = None,
) -> Report:
    """Run `pipeline` under the doctor and write reports/<pipeline>/<run-id>/report.{json,md}.

    `examples=None` analyses the full training set; otherwise a seeded subsample (the rehearsal).
    A Ctrl-C still writes a partial report (marked so) before the KeyboardInterrupt propagates.
    `thresholds` overrides the checks' limits (see `Thresholds`; the CLI reads them from pyproject.toml).
    """
    options = RunOptions(
        out_dir=Path(out_dir),
        examples=examples,
        queries=queries,
        device=device,
        seed=seed,
        progress=progress,
        run_id=run_id,
        fix=fix,
    )
    reporter = StageProgress(enabled=progress)
    run = create_run(pipeline, options, reporter)
    try:
        examine = lambda record: examine_stage(run, record, thresholds)  # noqa: E731
        run_train_stage(run, reporter, on_stage_done=examine)
        run_influence_stages(run, reporter, on_stage_done=examine)
        if options.probe_examples > 0:
            reporter.note(f"probing precision and damping on {options.probe_examples} examples")
            run.probes = run_probes(run, options.probe_examples, thresholds)
    except KeyboardInterrupt:
        _write(run, target)
        reporter.note(f"interrupted: partial report written to {run.run_dir / 'report.json'}")
        raise
    return _write(run, target)


def _write(run: Run, target: str | None) -> Report:
    problems = diagnose_findings(stage_views(run))
    broken = any(record.status in ("error", "fail", "interrupted") for record in run.stages.values())
    status = "sick" if problems or broken else "healthy"
    document = build_report(run, status, target, problems)
    write_text_atomic(run.run_dir / "report.json", json.dumps(document, indent=2, sort_keys=False) + "\n")
    write_text_atomic(run.run_dir / "report.md", render(document, markdown=True))
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
