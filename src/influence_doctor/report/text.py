"""Human-readable renderings of a report document: terminal text and Markdown."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

STATUS_WORDS = {
    "healthy": "HEALTHY — every stage ran and passed its checks.",
    "healed": "HEALED — problems were found and fixed; use the prescription {where}.",
    "sick": "SICK — the pipeline is broken as configured; see the diagnosis and findings {where}.",
}
"""The verdict line; `{where}` says where the prescription or the diagnosis is on the page that prints it."""


def status_words(status: str, where: str) -> str:
    return STATUS_WORDS.get(status, status).format(where=where)


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
    """The diagnosis as found, before any remedy: one root cause per line, each followed by the
    experiments that convicted it (or refuted the other suspects), so the reasoning can be checked."""
    lines = []
    for problem in document["pipeline"].get("diagnosis", []):
        lines.append(f"- [{problem['cause'] or 'unexplained'}] at {problem['stage']}: {problem['message']}")
        lines += [f"    experiment: {experiment_text(e)}" for e in problem.get("experiments", [])]
        if problem.get("basis") == "direct measurement":
            lines.append(f"    measured directly: {', '.join(problem['evidence'])} (no setting could change it)")
        elif problem.get("basis") == "presumption":
            lines.append("    not confirmed: no experiment could be run")
    return lines


def experiment_text(experiment: dict[str, Any]) -> str:
    """`change`: `measurement` before → after (verdict, on N examples)."""
    return (
        f"{experiment['change']}: {experiment['measurement']} {show_number(experiment['before'])} → "
        f"{show_number(experiment['after'])} ({experiment['verdict']}, {experiment['examples']} examples)"
    )


def show_number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else _clip(str(value), 60)


def skipped_lines(document: dict[str, Any]) -> list[str]:
    """Rungs considered and not applied, with the reason: known not to heal, or rehearsed and failed."""
    return [
        f"- {skip['rung']} (for {remedy['cause'] or 'an unexplained failure'}): {skip['reason']}"
        for remedy in document["remedies"]
        for skip in remedy.get("skipped", [])
    ]


def remedy_rows(document: dict[str, Any]) -> list[list[str]]:
    return [
        [
            str(i),
            r["cause"] or "—",
            r["rung"],
            _clip(r["change"], 60),
            ", ".join(r["stages_rerun"]) or "—",
            r["outcome"],
            f"{r['seconds']:.1f}",
        ]
        for i, r in enumerate(document["remedies"], 1)
    ]


def treatment_chain(document: dict[str, Any]) -> str:
    """problem → rung → problem revealed → rung …: how the applied rungs composed."""
    steps: list[str] = []
    for remedy in document["remedies"]:
        if remedy["outcome"] in ("exhausted", "rejected"):
            continue
        if not steps:
            steps.append(remedy["cause"] or "unexplained")
        steps.append(remedy["rung"] + (" (the method changed)" if remedy.get("method_changed") else ""))
        steps += [f"revealed {problem}" for problem in remedy.get("revealed", [])]
        if remedy["outcome"] == "healed":
            steps.append("healed")
    return " → ".join(steps)


def advice_lines(document: dict[str, Any]) -> list[str]:
    """Options that heal but fall below the fidelity bar: not applied, listed with their measured cost."""
    lines = []
    for option in document["prescription"].get("advice", []):
        fidelity = option["fidelity"]
        method = " (a different method: the scores approximate another quantity)" if option["method_changed"] else ""
        lines.append(
            f"- for {option['cause']}: {option['rung']}, {option['change']}{method}. Measured cost: rankings vs "
            f"{fidelity['reference']} at median per-query Spearman {_spearman(fidelity['median_spearman'])} "
            f"(worst {_spearman(fidelity['worst_spearman'])}) on {fidelity['examples']} examples; {option['reason']}."
        )
    return lines


def projection_lines(projection: dict[str, Any]) -> list[str]:
    """The full run as projected: per-stage peak memory and seconds, overflow headroom, memory advice."""
    lines = [
        f"Projected full run ({projection['examples_full']} examples, {projection['queries_full']} queries, "
        f"from {projection['examples_rehearsal']} rehearsed): about {projection['seconds']:.3g} s of kronfluence "
        f"stages, {_size(sum(projection['factor_bytes'].values()))} of factors."
    ]
    budget = projection.get("memory_budget_bytes")
    for stage, entry in projection["stages"].items():
        if "peak_bytes" in entry:
            verdict = (
                "" if budget is None else ("" if entry.get("fits", True) else f" — over the {_size(budget)} budget")
            )
            lines.append(
                f"  {stage}: peak {_size(entry['peak_bytes'])}"
                + (f", {entry['seconds']:.3g} s" if "seconds" in entry else "")
                + verdict
            )
    for advice in projection.get("advice", []):
        if advice["fits"]:
            lines.append(
                f"  to fit {advice['stage']}: {advice['setting']} (projected peak "
                f"{_size(advice['projected_peak_bytes'])})"
            )
        else:
            lines.append(f"  {advice['stage']}: no single documented setting brings it under the budget")
    tight = [h for h in projection.get("headroom", []) if h["dtype_max"] and h["max_projected"] > 0.1 * h["dtype_max"]]
    for headroom in tight:
        lines.append(
            f"  headroom {headroom['subject']}: {show_number(headroom['max_projected'])} of {headroom['dtype']}'s "
            f"{show_number(headroom['dtype_max'])} at full size"
        )
    return lines


def _size(value: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def fidelity_lines(document: dict[str, Any]) -> list[str]:
    lines = []
    exact = document["fidelity"].get("exact")
    if exact and "skipped" in exact:
        lines.append(f"Exact influence not computed: {exact['skipped']}.")
    if exact and "spearman" in exact:
        lines.append(
            f"Fidelity vs exact influence (kronfluence's Fisher and damping, {exact['parameters']} parameters, "
            f"{exact['train_examples_compared']} training examples): Spearman {exact['spearman']:.3f} / "
            f"Pearson {exact['pearson']:.3f}."
        )
    float64 = document["fidelity"].get("float64")
    if float64:
        parts = [
            f"pairwise median per-query Spearman {_spearman(v['median_spearman'])} "
            f"(worst {_spearman(v['worst_spearman'])})"
            if kind == "pairwise"
            else f"{kind} Spearman {_spearman(v['median_spearman'])}"
            for kind, v in float64.items()
        ]
        lines.append(f"Scores vs float64 at the same damping (probe subsample): {'; '.join(parts)}.")
    fix = document["fidelity"].get("fix")
    if not fix:
        return lines
    if fix.get("reference") is None or fix.get("undefined_reference"):
        return [*lines, f"Fidelity of the fix: {fix.get('reason')}."]
    verdict = (
        f"BELOW the {fix['limit']} limit: the fix distorts the rankings, no cure"
        if fix["below_limit"]
        else f"within the {fix['limit']} limit"
    )
    where = (
        f"{fix['examples']} examples × {fix['queries']} queries"
        if fix.get("queries")
        else f"{fix.get('examples', 0)} examples"
    )
    method = (
        " The method changed: the scores approximate another quantity than the one asked for."
        if fix.get("method_changed")
        else ""
    )
    return [
        *lines,
        f"Fidelity of the fix vs '{fix['reference']}' ({fix.get('reference_kind', 'reference')}, {where}): "
        f"median per-query Spearman {_spearman(fix['median_spearman'])} (worst {_spearman(fix['worst_spearman'])}, "
        f"top-10 overlap {_spearman(fix['top_overlap'])}) — {verdict}.{method}",
    ]


def _spearman(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "—"


def influence_lines(document: dict[str, Any], limit: int = 8) -> list[str]:
    lines = []
    for entry in document["scores"].get("top_influences", [])[:limit]:
        query = entry["query_text"] or f"query {entry['query']}"
        lines.append(f"  {query}")
        for item in entry["top"]:
            text = item["text"] or f"training example {item['train']}"
            lines.append(f"      {item['score']:+.4g}  {_clip(text, 90)}")
    return lines


def score_rows(document: dict[str, Any]) -> list[list[str]]:
    rows = []
    for kind, summary in document["scores"].items():
        if kind == "top_influences":
            continue
        rows.append([kind, *summary_cells(summary)])
    return rows


def summary_cells(summary: dict[str, Any]) -> list[str]:
    """shape, finite share, min, median, max of a score summary, as table cells."""
    return [
        "×".join(str(n) for n in summary["shape"]),
        f"{summary['finite_fraction']:.4f}",
        _fmt(summary["min"]),
        _fmt(summary["median"]),
        _fmt(summary["max"]),
    ]


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
    if document["remedies"]:
        parts += ["", "Remedies:" if not markdown else "## Remedies", ""]
        headers = ["#", "cause", "rung", "change", "re-ran", "outcome", "seconds"]
        parts.append(tabulate(remedy_rows(document), headers=headers, tablefmt=fmt))
        if chain := treatment_chain(document):
            parts += ["", f"Treatment: {chain}"]
        if skipped := skipped_lines(document):
            parts += ["", "Rungs not applied:" if not markdown else "### Rungs not applied", "", *skipped]
    if advice := advice_lines(document):
        parts += ["", "Advice, not applied (below the fidelity bar):" if not markdown else "## Advice", "", *advice]
    python = document["prescription"].get("python")
    if python:
        parts += ["", "Prescription:" if not markdown else "## Prescription", ""]
        parts += ["```python", python, "```"] if markdown else [python]
    parts += [line for text in fidelity_lines(document) for line in ("", text)]
    score_table = score_rows(document)
    if score_table:
        parts += ["", "Scores:" if not markdown else "## Scores", ""]
        headers = ["scores", "shape", "finite", "min", "median", "max"]
        parts.append(tabulate(score_table, headers=headers, tablefmt=fmt))
    influences = influence_lines(document)
    if influences:
        parts += [
            "",
            "Top influences (largest pairwise scores per query):" if not markdown else "## Top influences",
            "",
        ]
        parts += [f"    {line}" for line in influences] if markdown else influences
    if projection := document.get("projection"):
        parts += ["", *projection_lines(projection)]
    if pipeline["partial"]:
        parts += ["", f"PARTIAL report: the run was interrupted during {pipeline['interrupted_in']}."]
    parts += ["", f"Status: {status_words(document['status'], 'above')}"]
    return "\n".join(parts) + "\n"
