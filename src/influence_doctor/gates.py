"""CI gates: a report held to the limits in `[tool.influence-doctor.gates]`, and to a baseline report.

Gates read report.json documents (and the scores.safetensors beside them), so `compare` works on any
two reports, today's against a committed baseline.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from influence_doctor.config import Gates
from influence_doctor.errors import UsageError
from influence_doctor.findings import SEVERITY_RANK
from influence_doctor.report.strict_json import number


@dataclass
class GateResult:
    gate: str
    value: float | str | None
    limit: float | str | None
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        """As report.json's `gates` holds it (SPEC section 6): name, value, limit, verdict, detail."""
        return {
            "name": self.gate,
            "value": self.value,
            "limit": self.limit,
            "verdict": "pass" if self.passed else "fail",
            "detail": self.detail,
        }


def load_report(path: str | Path) -> tuple[dict[str, Any], Path]:
    """A report.json (or the folder holding one) and its folder; bad input is a one-sentence UsageError."""
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"{path} is not a report.json or a folder holding one.")
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{file} is not readable JSON: {exc}.") from None
    if not isinstance(document, dict) or "stages" not in document or "status" not in document:
        raise UsageError(f"{file} is not an influence-doctor report (no stages or status).")
    return document, file.parent


def collect_reports(path: str | Path) -> dict[str, Path]:
    """Pipeline name → its latest report.json under a folder `--out` wrote (<pipeline>/<run-id>/) or a
    baselines folder (<pipeline>/); the latest run is the most recently written report."""
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"{path} is not a report.json, a run folder, an --out folder or a baselines folder.")
    latest: dict[str, Path] = {}
    for file in sorted(root.glob("*/report.json")) + sorted(root.glob("*/*/report.json")):
        try:
            name = json.loads(file.read_text(encoding="utf-8"))["pipeline"]["name"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a report of ours: a folder may hold other things
        if name not in latest or file.stat().st_mtime > latest[name].stat().st_mtime:
            latest[name] = file
    if not latest:
        raise UsageError(f"{path} holds no influence-doctor report (looked for */report.json and */*/report.json).")
    return latest


def single_report(path: str | Path) -> bool:
    """Whether `path` names one report (a report.json, or a run folder holding one)."""
    path = Path(path)
    return path.is_file() or (path / "report.json").is_file()


def evaluate(
    current: dict[str, Any],
    gates: Gates,
    baseline: dict[str, Any] | None = None,
    current_dir: Path | None = None,
    baseline_dir: Path | None = None,
) -> list[GateResult]:
    results = [
        _status(current),
        _severity(current, gates),
        _remedies(current, gates),
        _condition(current, gates),
        _fix_fidelity(current, gates),
        _overhead(current, gates),
    ]
    if baseline is not None:
        results.append(_spearman(current, baseline, gates, current_dir, baseline_dir))
        results.append(_seconds(current, baseline, gates))
    return results


def _status(document: dict[str, Any]) -> GateResult:
    status = document["status"]
    return GateResult(
        "status",
        status,
        "healthy or healed",
        status in ("healthy", "healed"),
        "the pipeline must end healthy or healed",
    )


def _findings(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for stage in document["stages"] for f in stage.get("findings", [])]


def _severity(document: dict[str, Any], gates: Gates) -> GateResult:
    threshold = SEVERITY_RANK[gates.fail_on]
    hits = [f for f in _findings(document) if SEVERITY_RANK.get(f["severity"], 0) >= threshold]
    detail = ", ".join(sorted({f["check"] for f in hits})) or f"no finding at {gates.fail_on} or above"
    return GateResult("fail_on", float(len(hits)), 0.0, not hits, detail)


def _remedies(document: dict[str, Any], gates: Gates) -> GateResult:
    count = len(document.get("remedies", []))
    passed = gates.allow_remedies or count == 0
    return GateResult(
        "allow_remedies",
        float(count),
        "any" if gates.allow_remedies else 0.0,
        passed,
        f"{count} remedy rung(s) applied",
    )


def _condition(document: dict[str, Any], gates: Gates) -> GateResult:
    worst = 0.0
    for stage in document["stages"]:
        for metrics in stage.get("metrics", {}).get("checks", {}).values():
            value = number(metrics, "condition_after_damping") if isinstance(metrics, dict) else None
            if value is not None and value > worst:  # NaN never compares larger
                worst = value
    return GateResult(
        "max_condition_number",
        worst,
        gates.max_condition_number,
        worst <= gates.max_condition_number,
        "largest damped condition number of any factor",
    )


def _fix_fidelity(document: dict[str, Any], gates: Gates) -> GateResult:
    """A fix must not be worse than the problem: the healed scores' median per-query Spearman against the
    least-regularized finite run, else float64 of the configuration as given."""
    fix = (document.get("fidelity") or {}).get("fix") or {}
    value = number(fix, "median_spearman")
    if value is None or math.isnan(value):
        reason = fix.get("reason") or "no remedy changed the scores"
        # an applied fix that was not measured is never a pass, unless its reference defines no influence
        measured_nothing = bool(fix.get("reference")) and not fix.get("undefined_reference")
        return GateResult("min_fix_spearman", None, gates.min_fix_spearman, not measured_nothing, reason)
    return GateResult(
        "min_fix_spearman",
        value,
        gates.min_fix_spearman,
        value >= gates.min_fix_spearman,
        f"healed scores vs {fix.get('reference')!r}, median per-query Spearman of the worst kind",
    )


def _spearman(current, baseline, gates: Gates, current_dir, baseline_dir) -> GateResult:
    if (
        current["scores"]
        and baseline["scores"]
        and all(
            current["scores"].get(k, {}).get("digest") == v.get("digest")
            for k, v in baseline["scores"].items()
            if k != "top_influences"
        )
    ):
        return GateResult("min_score_spearman", 1.0, gates.min_score_spearman, True, "bit-identical scores")
    values = [v for v in score_rank_agreement(current_dir, baseline_dir).values() if not math.isnan(v)]
    if not values:
        return GateResult(
            "min_score_spearman",
            None,
            gates.min_score_spearman,
            False,
            "no comparable scores (different shapes, or scores.safetensors missing)",
        )
    worst = min(values)
    return GateResult(
        "min_score_spearman",
        worst,
        gates.min_score_spearman,
        worst >= gates.min_score_spearman,
        "Spearman of current vs baseline scores, worst kind",
    )


def score_rank_agreement(current_dir: Path | None, baseline_dir: Path | None) -> dict[str, float]:
    """Per score kind, the Spearman rank agreement of the two runs' scores (kinds of equal shape only)."""
    from influence_doctor.checks.precision import rank_agreement

    a, b = _scores(current_dir), _scores(baseline_dir)
    return {k: float(rank_agreement(a[k], b[k])) for k in sorted(set(a) & set(b)) if a[k].shape == b[k].shape}


def _scores(directory: Path | None) -> dict[str, Any]:
    if directory is None or not (directory / "scores.safetensors").is_file():
        return {}
    from safetensors.torch import load_file

    try:
        return load_file(str(directory / "scores.safetensors"))
    except Exception as exc:  # corrupt file: a clear sentence, not a traceback
        raise UsageError(f"{directory / 'scores.safetensors'} cannot be read: {exc}.") from None


TIMED_STAGES = ("covariance", "eigendecomposition", "lambda", "pairwise_scores", "self_scores")
"""kronfluence's stages; the train stage is the user's own loop, theirs to time (a load on the runner
moves it most: the demo's 4 s of training took 27 s under a full load)."""

MACHINE_FIELDS = ("cpu_model", "cpu_cores", "gpu_name", "gpu_memory_bytes")
"""What makes two timings comparable: the same CPU model and cores, the same GPU."""


def machine_of(document: dict[str, Any]) -> dict[str, Any] | None:
    machine = (document.get("environment") or {}).get("machine")
    return {key: machine.get(key) for key in MACHINE_FIELDS} if isinstance(machine, dict) else None


def describe_machine(machine: dict[str, Any] | None) -> str:
    if machine is None:
        return "a machine the report does not record"
    gpu = f", {machine['gpu_name']}" if machine.get("gpu_name") else ""
    return f"{machine.get('cpu_model')} ({machine.get('cpu_cores')} cores{gpu})"


def _seconds(current: dict[str, Any], baseline: dict[str, Any], gates: Gates) -> GateResult:
    """Stage seconds against the baseline's, like with like: on another machine (or one a report does
    not name) raw seconds say nothing about the code, and the verdict says so instead of failing; on the
    same machine a stage fails only when it is both `max_seconds_ratio` times and `min_seconds_difference`
    seconds slower, so scheduler noise on a short stage cannot fail it."""
    name, limit = "max_seconds_ratio", gates.max_seconds_ratio
    mine, theirs = machine_of(current), machine_of(baseline)
    if mine is None or theirs is None or mine != theirs:
        return GateResult(
            name,
            "not comparable",
            limit,
            True,
            f"not comparable: baseline from {describe_machine(theirs)}, this "
            f"run on {describe_machine(mine)}; stage seconds are compared on one machine only",
        )
    before = {s["name"]: s.get("seconds") for s in baseline["stages"]}
    timed = {
        s["name"]: (s["seconds"] / before[s["name"]], s["seconds"] - before[s["name"]])
        for s in current["stages"]
        if s["name"] in TIMED_STAGES and s.get("seconds") and before.get(s["name"])
    }
    if not timed:
        return GateResult(name, None, limit, True, "no kronfluence stage was timed in both reports")
    slower = {
        stage: (ratio, gap)
        for stage, (ratio, gap) in timed.items()
        if ratio > limit and gap > gates.min_seconds_difference
    }
    stage, (ratio, gap) = max((slower or timed).items(), key=lambda item: item[1][0])
    return GateResult(
        name,
        ratio,
        limit,
        not slower,
        f"slowest relative to baseline: {stage}, ×{ratio:.3g} and {gap:+.3g} s (fails past ×{limit:g} and "
        f"+{gates.min_seconds_difference:g} s together; same machine)",
    )


def _overhead(current: dict[str, Any], gates: Gates) -> GateResult:
    """The doctor's own seconds over the run's kronfluence seconds: the same on any machine."""
    timing = (current.get("pipeline") or {}).get("timing") or {}
    ratio = timing.get("overhead_ratio")
    if gates.max_overhead_ratio is None or ratio is None:
        why = "not set (max_overhead_ratio)" if gates.max_overhead_ratio is None else "the report records no timing"
        return GateResult("max_overhead_ratio", ratio, gates.max_overhead_ratio, True, why)
    return GateResult(
        "max_overhead_ratio",
        ratio,
        gates.max_overhead_ratio,
        ratio <= gates.max_overhead_ratio,
        f"doctor {timing.get('doctor_seconds', 0):.3g} s over kronfluence {timing.get('kronfluence_seconds', 0):.3g} s",
    )


def write_baseline(run_dir: Path, baseline_root: Path, pipeline: str) -> Path:
    """Copy a run's report.json and scores.safetensors to <baseline_root>/<pipeline>/, atomically."""
    from influence_doctor.atomic import write_bytes_atomic

    target = Path(baseline_root) / pipeline
    for name in ("report.json", "scores.safetensors"):
        source = Path(run_dir) / name
        if source.is_file():
            write_bytes_atomic(target / name, source.read_bytes())
    return target


def render_gates(results: list[GateResult]) -> str:
    from tabulate import tabulate

    rows = [[r.gate, _show(r.value), _show(r.limit), "pass" if r.passed else "FAIL", r.detail] for r in results]
    return tabulate(rows, headers=["gate", "value", "limit", "verdict", "detail"], tablefmt="simple")


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def record_gates(report: Any, results: list[GateResult]) -> None:
    """Write the evaluated gates into the run's own report.json (the doctor wrote it; no user file)."""
    from influence_doctor.atomic import write_text_atomic
    from influence_doctor.report.strict_json import dumps, strict

    report.document["gates"] = strict([result.to_dict() for result in results])
    write_text_atomic(Path(report.json_path), dumps(report.document))
