"""The --influence-check session: collect pipeline items, run each pipeline once, gate it, summarise."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from influence_doctor.config import Config, find_pyproject, load_config
from influence_doctor.errors import UsageError
from influence_doctor.findings import SEVERITY_RANK
from influence_doctor.pipeline import STAGES

PROPERTY = "influence"


def _config_of(config: pytest.Config) -> Config:
    try:
        return load_config(find_pyproject(Path(config.rootpath)))
    except UsageError as exc:
        raise pytest.UsageError(str(exc)) from None


@dataclass
class PipelineRun:
    """One pipeline's diagnosis and gate verdicts, computed once for all of its items."""

    target: str
    report: Any = None
    gates: list[Any] = field(default_factory=list)
    error: str | None = None


class InfluenceSession:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.settings = _config_of(config)
        root = Path(config.rootpath)
        self.reports_dir = Path(config.getoption("influence_reports") or root / self.settings.reports_dir)
        self.baseline_dir = root / self.settings.baseline_dir
        self.runs: dict[str, PipelineRun] = {}

    @property
    def targets(self) -> list[str]:
        return list(dict.fromkeys([*self.settings.pipelines, *self.config.getoption("influence_pipeline")]))

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, session: pytest.Session, items: list[pytest.Item]) -> None:
        from influence_doctor.targets import load_target

        if not self.targets:
            raise pytest.UsageError(
                "--influence-check found no pipelines: list TARGETs under [tool.influence-doctor] pipelines "
                "or pass --influence-pipeline TARGET."
            )
        for target in self.targets:
            try:
                name = load_target(target).name
            except UsageError as exc:
                raise pytest.UsageError(str(exc)) from None
            collector = PipelineCollector.from_parent(session, name=name, nodeid=name, target=target, influence=self)
            items.extend(collector.collect())

    def run(self, target: str) -> PipelineRun:
        """Diagnose (and heal) the pipeline on first use; later items of the same pipeline reuse it."""
        if target in self.runs:
            return self.runs[target]
        from influence_doctor import diagnose
        from influence_doctor.gates import evaluate, load_report, record_gates, write_baseline
        from influence_doctor.targets import load_target

        result = self.runs[target] = PipelineRun(target)
        try:
            pipeline = load_target(target)
            report = diagnose(
                pipeline,
                out_dir=self.reports_dir,
                progress=False,
                target=target,
                thresholds=self.settings.make_thresholds(),
                ladders=self.settings.ladders,
                min_fix_spearman=self.settings.gates.min_fix_spearman,
            )
            result.report = report
            baseline_folder = self.baseline_dir / report.run_dir.parent.name
            baseline = dir_ = None
            updating = self.config.getoption("influence_update_baseline")
            if not updating and (baseline_folder / "report.json").is_file():
                baseline, dir_ = load_report(baseline_folder)
            result.gates = evaluate(report.document, self.settings.gates, baseline, report.run_dir, dir_)
            record_gates(report, result.gates)
            if updating:  # the new baseline carries the gates it passed on its own
                write_baseline(report.run_dir, self.baseline_dir, report.run_dir.parent.name)
            report.run = None  # the items read the document: the next pipeline need not share memory with this one
        except Exception as exc:  # reported on every item of the pipeline, never a crash of the session
            result.error = f"{type(exc).__name__}: {exc}"
        return result

    @pytest.hookimpl(optionalhook=True, tryfirst=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        """Under `pytest -n N` a pipeline's items must share one worker, or each worker would diagnose
        the pipeline again: plain load balancing becomes load balancing by pipeline."""
        if config.getvalue("dist") not in ("load", "worksteal"):
            return None  # loadscope, loadfile and loadgroup keep a pipeline's items together already
        from influence_doctor_pytest.xdist import PipelineScheduling

        return PipelineScheduling(config, log)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if hasattr(self.config, "workerinput"):
            return  # under xdist the controller summarises what every worker reported, once
        rows = summary_rows(terminalreporter.stats)
        if not rows:
            return
        from tabulate import tabulate

        terminalreporter.section("influence-doctor")
        for pipeline, table in rows.items():
            terminalreporter.write_line(f"{pipeline}:")
            terminalreporter.write_line(tabulate(table, headers=["stage", "verdict", "remedies", "gate"]))
        if os.environ.get("GITHUB_ACTIONS"):
            for line in workflow_commands(terminalreporter.stats):
                terminalreporter.write_line(line)
        summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary_file:
            with open(summary_file, "a", encoding="utf-8") as stream:
                for pipeline, table in rows.items():
                    stream.write(f"### influence-doctor: {pipeline}\n\n")
                    stream.write(tabulate(table, headers=["stage", "verdict", "remedies", "gate"], tablefmt="github"))
                    stream.write("\n\n")


def workflow_commands(stats: dict[str, list[Any]]) -> list[str]:
    """GitHub Actions annotations for the findings that failed an item: `::error` for a `fail`,
    `::warning` for a `warn` that fails under `fail_on = "warn"`, each naming pipeline, stage, subject."""
    lines = []
    for reports in stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            props = dict(getattr(report, "user_properties", []))
            for severity, stage, subject, check, message in props.get(f"{PROPERTY}_failing", ()):
                command = "error" if severity == "fail" else "warning"
                pipeline = props.get(f"{PROPERTY}_pipeline", "")
                where = f"{stage} {subject}".strip()
                title = _escape_property(f"influence-doctor {pipeline}: {where}")
                lines.append(f"::{command} title={title}::{_escape_data(f'{check} ({where}): {message}')}")
    return lines


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def summary_rows(stats: dict[str, list[Any]]) -> dict[str, list[list[str]]]:
    """Rebuilt from the reports' user properties, so the table is right under xdist too."""
    tables: dict[str, list[list[str]]] = {}
    for reports in stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            props = dict(getattr(report, "user_properties", []))
            if f"{PROPERTY}_pipeline" not in props:
                continue
            tables.setdefault(props[f"{PROPERTY}_pipeline"], []).append(
                [
                    props[f"{PROPERTY}_stage"],
                    props[f"{PROPERTY}_verdict"],
                    props[f"{PROPERTY}_remedies"],
                    props.get(f"{PROPERTY}_gate", ""),
                ]
            )
    order = {name: i for i, name in enumerate([*STAGES, "gates"])}
    return {name: sorted(rows, key=lambda row: order.get(row[0], 99)) for name, rows in tables.items()}


class PipelineCollector(pytest.Collector):
    def __init__(self, *, target: str, influence: InfluenceSession, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target = target
        self.influence = influence

    def collect(self) -> list[pytest.Item]:
        items: list[pytest.Item] = [StageItem.from_parent(self, name=stage, stage=stage) for stage in STAGES]
        items.append(StageItem.from_parent(self, name="gates", stage="gates"))
        for item in items:
            item.add_marker(pytest.mark.influence)
            item.add_marker(pytest.mark.xdist_group(self.name))  # one worker runs a pipeline's items
        return items


class InfluenceFailure(Exception):
    """A stage or gate that did not pass; its message is the report."""


class StageItem(pytest.Item):
    def __init__(self, *, stage: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stage = stage

    def runtest(self) -> None:
        collector: PipelineCollector = self.parent  # type: ignore[assignment]
        result = collector.influence.run(collector.target)
        if result.error is not None:
            raise InfluenceFailure(f"the pipeline could not be checked: {result.error}")
        report = result.report
        remedies = str(len(report.remedies))
        self.user_properties += [
            (f"{PROPERTY}_pipeline", collector.name),
            (f"{PROPERTY}_stage", self.stage),
            (f"{PROPERTY}_remedies", remedies),
            (f"{PROPERTY}_status", report.status),
            (f"{PROPERTY}_report", str(report.json_path)),
        ]
        if self.stage == "gates":
            failed = [g for g in result.gates if not g.passed]
            self.user_properties += [
                (f"{PROPERTY}_verdict", report.status),
                (f"{PROPERTY}_gate", "fail" if failed else "pass"),
            ]
            if failed:
                lines = [f"{g.gate}: {g.value} vs limit {g.limit} ({g.detail})" for g in failed]
                raise InfluenceFailure("gates failed:\n" + "\n".join(lines))
            return
        stage = next(s for s in report.document["stages"] if s["name"] == self.stage)
        self.user_properties += [(f"{PROPERTY}_verdict", stage["status"]), (f"{PROPERTY}_seconds", stage["seconds"])]
        limit = SEVERITY_RANK[collector.influence.settings.gates.fail_on]
        bad = [f for f in stage["findings"] if SEVERITY_RANK.get(f["severity"], 0) >= limit]
        self.user_properties.append(
            (
                f"{PROPERTY}_failing",
                [(f["severity"], self.stage, f["subject"], f["check"], f["message"]) for f in bad],
            )
        )
        if stage["status"] in ("error", "interrupted") or bad:
            lines = [f"{f['severity']} {f['check']} {f['subject']}: {f['message']}" for f in bad]
            if stage.get("error"):
                lines.insert(0, f"{stage['error']['type']}: {stage['error']['message']}")
            raise InfluenceFailure(f"{self.stage} is {stage['status']} ({report.json_path}):\n" + "\n".join(lines))
        if stage["status"] == "not-run":
            raise InfluenceFailure(f"{self.stage} did not run: {stage['reason']}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, InfluenceFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"{self.parent.name}::{self.name}"


class HandDoctor:
    """What the `influence_doctor` fixture hands a test: diagnose with the project's config applied."""

    def __init__(self, config: pytest.Config) -> None:
        self.settings = _config_of(config)
        root = Path(config.rootpath)
        self.reports_dir = Path(config.getoption("influence_reports") or root / self.settings.reports_dir)

    def diagnose(self, pipeline: Any, **kwargs: Any) -> Any:
        from influence_doctor import Pipeline, diagnose
        from influence_doctor.targets import load_target

        if not isinstance(pipeline, Pipeline):
            pipeline = load_target(str(pipeline))
        kwargs.setdefault("out_dir", self.reports_dir)
        kwargs.setdefault("progress", False)
        kwargs.setdefault("thresholds", self.settings.make_thresholds())
        kwargs.setdefault("ladders", self.settings.ladders)
        return diagnose(pipeline, **kwargs)
