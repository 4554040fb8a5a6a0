"""Terminal text and Markdown for an inspect document, in the same tables as `diagnose` prints."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

from influence_doctor.report.text import finding_rows, summary_cells

STATUS_WORDS = {
    "healthy": "HEALTHY — everything found on disk passed its checks.",
    "sick": "SICK — what kronfluence wrote is broken; see the findings.",
}


def render(document: dict[str, Any], markdown: bool = False) -> str:
    """What was read, the stage table, the findings, the score summary and the verdict."""
    fmt = "github" if markdown else "simple"
    parts = [
        f"{'# ' if markdown else ''}influence-doctor inspect: {document['path']}",
        _read_line(document),
        "",
        tabulate(stage_rows(document), headers=["stage", "status", "findings", "read from", "detail"], tablefmt=fmt),
    ]
    if document.get("diagnosis"):
        parts += ["", "## Diagnosis" if markdown else "Diagnosis:", ""]
        parts += [f"- [{p['cause'] or 'unexplained'}] at {p['stage']}: {p['message']}" for p in document["diagnosis"]]
    if findings := finding_rows(document):
        parts += ["", "## Findings" if markdown else "Findings:", ""]
        headers = ["severity", "stage", "check", "subject", "cause", "message"]
        parts.append(tabulate(findings, headers=headers, tablefmt=fmt))
    if scores := score_rows(document):
        parts += ["", "## Scores" if markdown else "Scores:", ""]
        headers = ["scores", "folder", "shape", "finite", "min", "median", "max"]
        parts.append(tabulate(scores, headers=headers, tablefmt=fmt))
    parts += ["", f"Status: {STATUS_WORDS.get(document['status'], document['status'])}"]
    return "\n".join(parts) + "\n"


def _read_line(document: dict[str, Any]) -> str:
    described = [f"{s['folder']} ({s['strategy']})" for s in document["sources"]]
    return "Read " + ", ".join(described) + "." if described else "Nothing read."


def stage_rows(document: dict[str, Any]) -> list[list[str]]:
    return [
        [stage["name"], stage["status"], str(len(stage["findings"])), ", ".join(stage["sources"]), _detail(stage)]
        for stage in document["stages"]
    ]


def _detail(stage: dict[str, Any]) -> str:
    """The reason a stage is absent, else the dtypes stored on disk and how partitions were merged."""
    if stage["reason"]:
        return _clip(stage["reason"])
    several = len(stage["metrics"]) > 1
    parts = []
    for folder, metrics in stage["metrics"].items():
        dtypes = _stored_dtypes(metrics["stored"])
        if len(set(dtypes.values())) == 1:
            text = f"stored {next(iter(dtypes.values()))}"
        else:
            text = ", ".join(f"{name}={dtype}" for name, dtype in dtypes.items())
        if partitions := metrics.get("partitions"):
            total = partitions["data_partitions"] * partitions["module_partitions"]
            text += f"; merged {len(partitions['merged'])} of {total} partitions"
        parts.append(f"{folder}: {text}" if several else text)
    return _clip("; ".join(parts))


def _stored_dtypes(stored: dict[str, Any]) -> dict[str, str]:
    """{factor: "float16"} for factor stages (counts left out), {"scores": "float32"} for score stages."""
    if all("dtype" in info for info in stored.values()):
        return {"scores": "/".join(sorted({info["dtype"] for info in stored.values()}))}
    return {
        name: "/".join(sorted({info["dtype"] for info in modules.values()}))
        for name, modules in stored.items()
        if not name.startswith("num_")
    }


def score_rows(document: dict[str, Any]) -> list[list[str]]:
    rows = []
    for stage in document["stages"]:
        for folder, metrics in stage["metrics"].items():
            if summary := metrics.get("summary"):
                rows.append([stage["name"].removesuffix("_scores"), folder, *summary_cells(summary)])
    return rows


def _clip(text: str, width: int = 90) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
