"""What differs between two reports, timings aside: the other half of `influence-doctor compare`.

Two runs of one pipeline with one seed on one machine compute the same numbers; only what the clock
and the allocator measured may move. Those volatile fields (seconds, resident memory and everything
projected from them, the run's own folder names) are dropped before comparing; everything else that
differs is listed, grouped by what a person asks first: did the verdict change, which findings came
or went, did the doctor do something else, did the scores move.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

SECTIONS = ("status", "diagnosis", "findings", "remedies", "prescription", "scores", "fidelity", "projection", "other")
"""Order in which differences are listed: the verdict first, the raw numbers last."""

VOLATILE_KEYS = frozenset(
    {
        "seconds",
        "memory",  # measured resident or allocator memory (a stage metric, a projection entry)
        "peak_bytes",
        "rehearsal_peak_bytes",
        "rehearsal_seconds",
        "projected_full_seconds",
        "projected_rehearsal_seconds",
        "budget_seconds",
        "pilot_seconds",
        "stage_seconds",
        "fixed_seconds",
        "seconds_per_batch",
        "fits",  # a projected peak against the budget
        "advice",  # settings that fit the budget, chosen from projected peaks
        "run_id",
        "run_dir",
        "analysis_dir",
        "gates",  # held to limits by compare itself
        "executable",
        "speed",  # the machine's speed calibration, measured in every run
        "timing",  # where a run's seconds went, and their ratio
    }
)
"""Keys whose values are clock or allocator readings, or the run's own identity, at any depth."""

MAX_LISTED = 50
"""Differences kept per section; the rest are counted, so two unrelated reports stay readable."""


def differences(baseline: dict[str, Any], current: dict[str, Any]) -> list[dict[str, Any]]:
    """Every difference apart from timings, as {section, change, path, baseline, current, text}."""
    found: list[dict[str, Any]] = []
    found += _status(baseline, current)
    found += _diagnosis(baseline, current)
    found += _findings(baseline, current)
    found += _remedies(baseline, current)
    for section in ("prescription", "scores", "fidelity", "projection"):
        found += [
            _entry(section, "changed", path, old, new)
            for path, old, new in _walk(baseline.get(section), current.get(section), section)
        ]
    other = {key: value for key, value in baseline.items() if key not in (*SECTIONS, "stages", "pipeline")}
    other_current = {key: value for key, value in current.items() if key not in (*SECTIONS, "stages", "pipeline")}
    other["pipeline"] = {k: v for k, v in baseline.get("pipeline", {}).items() if k != "diagnosis"}
    other_current["pipeline"] = {k: v for k, v in current.get("pipeline", {}).items() if k != "diagnosis"}
    other["stages"] = _stages_without_findings(baseline)
    other_current["stages"] = _stages_without_findings(current)
    found += [_entry("other", "changed", path, old, new) for path, old, new in _walk(other, other_current, "")]
    return _capped(found)


def identical_apart_from_timings(found: list[dict[str, Any]]) -> bool:
    return not found


def render_differences(found: list[dict[str, Any]]) -> str:
    if not found:
        return "The reports are identical apart from timings."
    lines = [f"{_count(found)} difference(s) apart from timings:"]
    for section in SECTIONS:
        entries = [entry for entry in found if entry["section"] == section]
        if entries:
            lines.append(f"  {section}:")
            lines += [f"    {entry['text']}" for entry in entries]
    return "\n".join(lines)


def _count(found: list[dict[str, Any]]) -> int:
    return sum(entry.get("more", 0) + (0 if entry["change"] == "more" else 1) for entry in found)


def _entry(section: str, change: str, path: str, old: Any, new: Any, text: str | None = None) -> dict[str, Any]:
    if text is None:
        text = f"{path}: {_show(old)} → {_show(new)}"
    return {"section": section, "change": change, "path": path, "baseline": old, "current": new, "text": text}


def _status(baseline: dict[str, Any], current: dict[str, Any]) -> list[dict[str, Any]]:
    old, new = baseline.get("status"), current.get("status")
    return [] if old == new else [_entry("status", "changed", "status", old, new, f"status: {old} → {new}")]


def _problem_key(problem: dict[str, Any]) -> tuple[Any, ...]:
    return (problem.get("cause"), problem.get("stage"), tuple(problem.get("subjects") or ()))


def _diagnosis(baseline: dict[str, Any], current: dict[str, Any]) -> list[dict[str, Any]]:
    old = {_problem_key(p): p for p in baseline.get("pipeline", {}).get("diagnosis", [])}
    new = {_problem_key(p): p for p in current.get("pipeline", {}).get("diagnosis", [])}
    found = []
    for key in sorted(old.keys() - new.keys(), key=str):
        text = f"cause gone: {key[0]} at {key[1]}"
        found.append(_entry("diagnosis", "removed", "pipeline.diagnosis", key[0], None, text))
    for key in sorted(new.keys() - old.keys(), key=str):
        text = f"new cause: {key[0]} at {key[1]}"
        found.append(_entry("diagnosis", "added", "pipeline.diagnosis", None, key[0], text))
    for key in sorted(old.keys() & new.keys(), key=str):
        for path, a, b in _walk(old[key], new[key], f"pipeline.diagnosis[{key[0]}@{key[1]}]"):
            found.append(_entry("diagnosis", "changed", path, a, b))
    return found


def _finding_key(finding: dict[str, Any]) -> tuple[str, str, str]:
    return (finding.get("stage", ""), finding.get("check", ""), finding.get("subject", ""))


def _findings(baseline: dict[str, Any], current: dict[str, Any]) -> list[dict[str, Any]]:
    def index(document: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
        return {_finding_key(f): f for stage in document.get("stages", []) for f in stage.get("findings", [])}

    old, new = index(baseline), index(current)
    found = []
    for key in sorted(old.keys() - new.keys()):
        finding = old[key]
        found.append(
            _entry("findings", "removed", _finding_path(key), finding["severity"], None, f"gone: {_describe(finding)}")
        )
    for key in sorted(new.keys() - old.keys()):
        finding = new[key]
        found.append(
            _entry("findings", "added", _finding_path(key), None, finding["severity"], f"new: {_describe(finding)}")
        )
    for key in sorted(old.keys() & new.keys()):
        for path, a, b in _walk(old[key], new[key], _finding_path(key)):
            if not path.endswith(".message"):  # the message restates value and limit in words
                found.append(_entry("findings", "changed", path, a, b))
    return found


def _finding_path(key: tuple[str, str, str]) -> str:
    stage, check, subject = key
    return f"{stage}:{check}" + (f"[{subject}]" if subject else "")


def _describe(finding: dict[str, Any]) -> str:
    subject = f" {finding['subject']}" if finding.get("subject") else ""
    return f"{finding['severity']} {finding['check']}{subject} ({finding['stage']})"


def _remedies(baseline: dict[str, Any], current: dict[str, Any]) -> list[dict[str, Any]]:
    def ladder(document: dict[str, Any]) -> list[str]:
        return [f"{r.get('cause')}: {r.get('rung')} → {r.get('outcome')}" for r in document.get("remedies", [])]

    old, new = ladder(baseline), ladder(current)
    found = []
    if old != new:
        found.append(
            _entry(
                "remedies",
                "changed",
                "remedies",
                old,
                new,
                f"rungs: [{'; '.join(old) or 'none'}] → [{'; '.join(new) or 'none'}]",
            )
        )
    else:
        for index, (a, b) in enumerate(zip(baseline.get("remedies", []), current.get("remedies", []), strict=False)):
            found += [_entry("remedies", "changed", path, x, y) for path, x, y in _walk(a, b, f"remedies[{index}]")]
    return found


def _stages_without_findings(document: dict[str, Any]) -> dict[str, Any]:
    return {
        stage.get("name", str(index)): {k: v for k, v in stage.items() if k not in ("findings", "problems")}
        for index, stage in enumerate(document.get("stages", []))
    }


def _walk(old: Any, new: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """(path, old, new) for every leaf that differs, volatile keys skipped at any depth."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if key in VOLATILE_KEYS or str(key).endswith("_seconds"):
                continue
            child = f"{path}.{key}" if path else str(key)
            if key not in old:
                yield child, None, new[key]
            elif key not in new:
                yield child, old[key], None
            else:
                yield from _walk(old[key], new[key], child)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for index, (a, b) in enumerate(zip(old, new, strict=True)):
            yield from _walk(a, b, f"{path}[{index}]")
    elif old != new:
        yield path, old, new


def _capped(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    kept: list[dict[str, Any]] = []
    for section in SECTIONS:
        entries = [entry for entry in found if entry["section"] == section]
        kept += entries[:MAX_LISTED]
        if len(entries) > MAX_LISTED:
            more = len(entries) - MAX_LISTED
            kept.append(
                {
                    "section": section,
                    "change": "more",
                    "path": section,
                    "baseline": None,
                    "current": None,
                    "more": more,
                    "text": f"… and {more} more in {section}",
                }
            )
    return kept


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return "—" if value is None else str(value)
