"""The inspect document: the checks applied to what was read, one verdict per stage, as plain JSON.

It keeps the report.json keys that apply to files on disk (`schema_version`, `tool`, `status`, `stages`)
and adds what was read (`path`, `factors_names`, `scores_names`, `sources`). Stage metrics are keyed by
the folder they were read from, because an analysis folder may hold several factors or scores folders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from influence_doctor.atomic import write_text_atomic
from influence_doctor.checks.scores import total_scores
from influence_doctor.diagnosis import StageView, diagnose_findings, relabel
from influence_doctor.errors import UsageError
from influence_doctor.examine import StageExam, examine_artifacts
from influence_doctor.findings import Finding, worst_severity
from influence_doctor.findings import info as info_finding
from influence_doctor.inspect.reader import SCORE_STAGES, Source, read_path
from influence_doctor.pipeline import STAGES
from influence_doctor.report.document import SCHEMA_VERSION
from influence_doctor.report.scores import summarize_scores
from influence_doctor.report.strict_json import dumps, strict
from influence_doctor.version import __version__

DOCUMENT_NAME = "inspect.json"
_MERGED_NOUNS = {
    "covariance": "covariance sums",
    "lambda": "Lambda sums",
    "pairwise_scores": "pairwise scores",
    "self_scores": "self scores",
}


def inspect_path(
    path: str | Path,
    factors: Sequence[str] | None = None,
    scores: Sequence[str] | None = None,
    thresholds: Any = None,
) -> dict[str, Any]:
    """Read kronfluence's output at `path`, check it, and return the inspect document."""
    return build_document(path, read_path(path, factors, scores), thresholds)


def build_document(path: str | Path, sources: list[Source], thresholds: Any = None) -> dict[str, Any]:
    stages: dict[str, dict[str, Any]] = {name: _entry(name) for name in STAGES}
    findings: dict[str, list[tuple[str, list[Finding]]]] = {name: [] for name in STAGES}
    for source in sources:
        exams = _examine(source, sources, thresholds)
        for stage, artifact in source.artifacts.items():
            exam = exams.get(stage, StageExam())
            stages[stage]["sources"].append(source.folder)
            stages[stage]["metrics"][source.folder] = _metrics(source, stage, artifact, exam)
            findings[stage].append((source.folder, exam.findings + _partition_findings(source, stage)))
    flat_by_stage = {name: _settle(entry, findings[name], sources) for name, entry in stages.items()}
    problems = diagnose_findings(StageView(name, stages[name]["status"], flat_by_stage[name]) for name in STAGES)
    causes = relabel(problems)
    for name, entry in stages.items():
        entry["findings"] = [{**f.to_dict(), "cause": causes.get(id(f), f.cause)} for f in flat_by_stage[name]]
        entry["problems"] = [p.to_dict() for p in problems if p.stage == name]
    status = "sick" if problems or any(entry["status"] == "fail" for entry in stages.values()) else "healthy"
    return _jsonable(
        {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "influence-doctor", "version": __version__, "command": "inspect"},
            "status": status,
            "diagnosis": [p.to_dict() for p in problems],
            "path": str(path),
            "factors_names": [source.name for source in sources if source.kind == "factors"],
            "scores_names": [source.name for source in sources if source.kind == "scores"],
            "stages": list(stages.values()),
            "sources": [_describe(source, sources) for source in sources],
        }
    )


def check_out_dir(out_dir: str | Path, path: str | Path) -> None:
    """The report goes anywhere but inside the inspected folder, which must stay untouched."""
    out, inspected = Path(out_dir).resolve(), Path(path).resolve()
    if out == inspected or inspected in out.parents:
        raise UsageError(f"--out {out_dir} is inside {path}, which inspect only reads; choose another folder.")


def write_document(document: dict[str, Any], out_dir: str | Path, path: str | Path) -> Path:
    """Write `out_dir/inspect.json` atomically."""
    check_out_dir(out_dir, path)
    target = Path(out_dir) / DOCUMENT_NAME
    try:
        return write_text_atomic(target, dumps(document))
    except OSError as exc:
        raise UsageError(f"{target} cannot be written ({' '.join(str(exc).split())}).") from None


def _entry(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "status": "not-run",
        "seconds": None,
        "findings": [],
        "metrics": {},
        "sources": [],
        "reason": None,
    }


def paired_factors(scores: Source, sources: list[Source]) -> Source | None:
    """The factors folder a scores folder was computed from, when it can be told.

    A scores folder keeps a copy of its factor arguments but not the factors name: pair it with the one
    factors folder whose arguments match, or among several, the one whose name starts its own name.
    """
    wanted = scores.factor_args.to_dict()
    matches = [s for s in sources if s.kind == "factors" and s.factor_args.to_dict() == wanted]
    if len(matches) > 1:
        matches = sorted((s for s in matches if scores.name.startswith(s.name)), key=lambda s: -len(s.name))[:1]
    return matches[0] if len(matches) == 1 else None


def _examine(source: Source, sources: list[Source], thresholds: Any) -> dict[str, StageExam]:
    """Score checks may read the factors they were computed from (e.g. damping against the spectrum), and
    factor checks judge conditioning with the damping of the scores computed from them, when known."""
    artifacts, score_args = dict(source.artifacts), source.score_args
    if source.kind == "scores" and (factors := paired_factors(source, sources)) is not None:
        artifacts = {**factors.artifacts, **artifacts}
    if source.kind == "factors":
        score_args = _damping_source(source, sources)
    return examine_artifacts(artifacts, source.factor_args, score_args, thresholds, stages=list(source.artifacts))


def _damping_source(factors: Source, sources: list[Source]) -> Any:
    """ScoreArguments of the scores computed from `factors` when they agree on damping and precondition
    dtype (what factor checks read); else None, and the checks assume kronfluence's defaults."""
    found = {
        (s.score_args.damping_factor, str(s.score_args.precondition_dtype)): s.score_args
        for s in sources
        if s.kind == "scores" and s.score_args is not None and paired_factors(s, sources) is factors
    }
    return next(iter(found.values())) if len(found) == 1 else None


def _metrics(source: Source, stage: str, artifact: dict[str, Any], exam: StageExam) -> dict[str, Any]:
    metrics: dict[str, Any] = {"stored": _stored(artifact)}
    if stage in source.partitions:
        metrics["partitions"] = source.partitions[stage]
    if stage in SCORE_STAGES:
        metrics["summary"] = summarize_scores(total_scores(artifact))
    metrics.update(exam.metrics)
    return metrics


def _stored(artifact: dict[str, Any]) -> dict[str, Any]:
    """Shapes and dtypes as stored, the same shape the runner records: {factor: {module: {shape, dtype}}}."""
    return {
        key: {module: _tensor_info(tensor) for module, tensor in value.items()}
        if isinstance(value, dict)
        else _tensor_info(value)
        for key, value in artifact.items()
    }


def _tensor_info(tensor: Any) -> dict[str, Any]:
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}


def _partition_findings(source: Source, stage: str) -> list[Finding]:
    """Partial partitions are worth knowing, but say nothing about numerical health: info only."""
    info = source.partitions.get(stage)
    if not info or info["complete"]:
        return []
    total = info["data_partitions"] * info["module_partitions"]
    return [
        info_finding(
            f"{stage}.partitions",
            f"Only {len(info['merged'])} of {total} partitions were computed and none aggregated; "
            f"the merged {_MERGED_NOUNS[stage]} cover only part of the data or of the modules.",
            stage=stage,
            value=float(len(info["merged"])),
            limit=float(total),
        )
    ]


def _settle(entry: dict[str, Any], found: list[tuple[str, list[Finding]]], sources: list[Source]) -> list[Finding]:
    """Status from the worst finding; a stage with nothing on disk is skipped or not-run, with the reason.

    Returns the stage's findings (subjects prefixed with their folder when several were read)."""
    several = len(found) > 1
    flat = [_attributed(f, folder) if several else f for folder, findings in found for f in findings]
    if found:
        entry["status"] = {"fail": "fail", "warn": "warn"}.get(worst_severity(flat) or "", "ok")
        return flat
    entry["status"], entry["reason"] = _absent(entry["name"], sources)
    return flat


def _attributed(finding: Finding, folder: str) -> Finding:
    subject = f"{folder}:{finding.subject}" if finding.subject else folder
    return dataclasses.replace(finding, subject=subject)


def _absent(stage: str, sources: list[Source]) -> tuple[str, str]:
    if stage == "train":
        return "not-run", "inspect reads files only; there is no model to check"
    if stage in SCORE_STAGES:
        return "not-run", f"no {stage.replace('_', ' ')} found"
    if sources and not any(source.needs(stage) for source in sources):
        return "skipped", f"strategy {sources[0].factor_args.strategy!r} does not need it"
    factors = [source for source in sources if source.kind == "factors" and source.needs(stage)]
    if not factors:
        return "not-run", "no factors folder was inspected"
    folders = ", ".join(source.folder for source in factors)
    if stage == "eigendecomposition" and any("covariance" in source.artifacts for source in factors):
        return "not-run", f"{folders} holds covariance but no eigendecomposition: it failed or never ran"
    return "not-run", f"no {stage} files in {folders}"


def _describe(source: Source, sources: list[Source]) -> dict[str, Any]:
    described: dict[str, Any] = {
        "kind": source.kind,
        "folder": source.folder,
        "name": source.name,
        "directory": str(source.directory),
        "strategy": str(source.factor_args.strategy),
        "stages": list(source.artifacts),
        "factor_args": source.factor_args.to_dict(),
        "score_args": source.score_args.to_dict() if source.score_args is not None else None,
        "files": sorted(source.files),
        "ignored_arguments": source.ignored_arguments,
    }
    if source.kind == "scores":
        paired = paired_factors(source, sources)
        described["paired_factors"] = paired.folder if paired is not None else None
    return described


def _jsonable(value: Any) -> Any:
    """Plain JSON types only, in strict JSON: inf and NaN become null with the reason beside them."""
    return strict(_plain(value))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
        return _plain(value.item())
    return str(value)
