"""Human-readable renderings of a report document: terminal text and Markdown."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

STATUS_WORDS = {
    "healthy": "HEALTHY — every stage ran and passed its checks.",
    "healed": "HEALED — problems were found and fixed; use the prescription below.",
    "sick": "SICK — the pipeline is broken as configured; see the findings below.",
}


def stage_rows(document: dict[str, Any]) -> list[list[str]]:
    rows = []
    for stage in document["stages"]:
        seconds = stage["seconds"]
        rows.append(
            [
                stage["name"],
                stage["status"],
                "" if seconds is None else f"{seconds:.2f}",
                str(len(stage["findings"])),
                _stage_detail(stage),
            ]
        )
    return rows


def _stage_detail(stage: dict[str, Any]) -> str:
    if stage["error"]:
        first_line = stage["error"]["message"].splitlines()[0] if stage["error"]["message"] else ""
        return f"{stage['error']['type'].rsplit('.', 1)[-1]}: {_clip(first_line)}"
    if stage["reason"]:
        return _clip(stage["reason"])
    dtypes = {name: value for name, value in stage["configured_dtypes"].items() if value}
    return ", ".join(f"{name.removesuffix('_dtype')}={value}" for name, value in dtypes.items())


def _clip(text: str, width: int = 80) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


MAX_FINDING_ROWS = 12
"""Findings shown in the terminal; the rest are in report.json and report.md."""


def finding_rows(document: dict[str, Any]) -> list[list[str]]:
    """Fails before warns, in pipeline order: the first rows are the ones to read."""
    rows = [
        [f["severity"], f["stage"], f["check"], f["subject"] or "—", f["cause"] or "—", f["message"]]
        for stage in document["stages"]
        for f in stage["findings"]
        if f["severity"] != "info"
    ]
    return sorted(rows, key=lambda row: row[0] != "fail")


def problem_lines(document: dict[str, Any]) -> list[str]:
    lines = []
    for stage in document["stages"]:
        for problem in stage.get("problems", []):
            cause = problem["cause"] or "unexplained"
            lines.append(f"- [{cause}] at {problem['stage']}: {problem['message']}")
    return lines


def score_rows(document: dict[str, Any]) -> list[list[str]]:
    rows = []
    for kind, summary in document["scores"].items():
        rows.append(
            [
                kind,
                "×".join(str(n) for n in summary["shape"]),
                f"{summary['finite_fraction']:.4f}",
                _fmt(summary["min"]),
                _fmt(summary["median"]),
                _fmt(summary["max"]),
            ]
        )
    return rows


def _fmt(value: Any) -> str:
    return "—" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))


def render(document: dict[str, Any], markdown: bool = False) -> str:
    """The stage table, findings, score summary and verdict; GitHub Markdown when `markdown`."""
    fmt = "github" if markdown else "simple"
    pipeline = document["pipeline"]
    rehearsal = pipeline["rehearsal"]
    head = "# " if markdown else ""
    parts = [
        f"{head}influence-doctor: {pipeline['name']}",
        f"{rehearsal['examples']} of {rehearsal['examples_total']} training examples, "
        f"{rehearsal['queries']} queries, on {document['environment']['device']}, "
        f"seed {document['config']['seed']}",
        "",
        tabulate(stage_rows(document), headers=["stage", "status", "seconds", "findings", "detail"], tablefmt=fmt),
    ]
    problems = problem_lines(document)
    if problems:
        parts += ["", "Diagnosis:" if not markdown else "## Diagnosis", "", *problems]
    findings = finding_rows(document)
    if findings:
        shown = findings if markdown else findings[:MAX_FINDING_ROWS]
        parts += ["", "Findings:" if not markdown else "## Findings", ""]
        parts.append(
            tabulate(shown, headers=["severity", "stage", "check", "subject", "cause", "message"], tablefmt=fmt)
        )
        if len(shown) < len(findings):
            parts.append(f"… and {len(findings) - len(shown)} more findings in report.json / report.md")
    if document["scores"]:
        parts += ["", "Scores:" if not markdown else "## Scores", ""]
        parts.append(
            tabulate(
                score_rows(document),
                headers=["scores", "shape", "finite", "min", "median", "max"],
                tablefmt=fmt,
            )
        )
    if pipeline["partial"]:
        parts += ["", f"PARTIAL report: the run was interrupted during {pipeline['interrupted_in']}."]
    parts += ["", f"Status: {STATUS_WORDS.get(document['status'], document['status'])}"]
    return "\n".join(parts) + "\n"
