"""`[tool.influence-doctor]` in pyproject.toml: read by the CLI and the pytest plugin; flags override it."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from influence_doctor.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Gates:
    fail_on: str = field(default="fail", metadata={"help": "Finding severity that fails the gate: fail or warn."})
    allow_remedies: bool = field(default=True, metadata={"help": "A healed pipeline passes; false: any remedy fails."})
    max_condition_number: float = field(
        default=1e12, metadata={"help": "Largest damped condition number any factor may have."}
    )
    min_score_spearman: float = field(default=0.95, metadata={"help": "Scores vs baseline scores, Spearman."})
    max_seconds_ratio: float = field(
        default=2.0, metadata={"help": "Stage time vs baseline stage time, on the same machine..."}
    )
    min_seconds_difference: float = field(
        default=5.0,
        metadata={
            "help": "...and only when the stage is also this many seconds slower: under a load on every core of "
            "a 2-core runner the demo's kronfluence stages moved by up to 3.1 s (benchmarks/timing_noise.py), ×1.5."
        },
    )
    max_overhead_ratio: float | None = field(
        default=None,
        metadata={
            "help": "The doctor's own seconds over the run's kronfluence seconds (machine-independent); "
            "unset: not gated."
        },
    )
    min_fix_spearman: float = field(
        default=0.9,
        metadata={
            "help": "Healed scores vs the least-regularized finite run (Spearman): no fix worse than the problem."
        },
    )


@dataclass(frozen=True)
class Config:
    pipelines: tuple[str, ...] = field(default=(), metadata={"help": "TARGETs the pytest plugin checks."})
    reports_dir: str = field(default="reports", metadata={"help": "Where reports/<pipeline>/<run-id>/ go."})
    baseline_dir: str = field(default="reports/baselines", metadata={"help": "Committed baseline reports."})
    gates: Gates = field(default_factory=Gates, metadata={"help": "CI gate limits."})
    thresholds: dict[str, float] = field(default_factory=dict, metadata={"help": "Check threshold overrides."})
    ladders: dict[str, list[str]] = field(default_factory=dict, metadata={"help": "Remedy ladder overrides."})
    source: str | None = field(default=None, metadata={"help": "The pyproject.toml it came from, if any."})

    def make_thresholds(self) -> Any:
        from influence_doctor.checks.thresholds import Thresholds

        try:
            return Thresholds.from_mapping(self.thresholds)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{self.source}: [tool.influence-doctor.thresholds]: {exc}.") from None


def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest pyproject.toml at or above `start` (the working directory by default)."""
    here = (start or Path.cwd()).resolve()
    for directory in (here, *here.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def load_config(path: Path | None = None) -> Config:
    """Read the config table; a missing file or table gives the defaults, a wrong key exit 2."""
    path = path or find_pyproject()
    if path is None:
        return Config()
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"Cannot read {path}: {exc}.") from None
    table = document.get("tool", {}).get("influence-doctor")
    if table is None:
        return Config(source=str(path))
    return parse_config(table, str(path))


def parse_config(table: dict[str, Any], source: str) -> Config:
    known = {f.name for f in fields(Config)} - {"source"}
    _reject_unknown(table, known, f"{source}: [tool.influence-doctor]")
    gates_table = table.get("gates", {})
    _reject_unknown(gates_table, {f.name for f in fields(Gates)}, f"{source}: [tool.influence-doctor.gates]")
    if gates_table.get("fail_on", "fail") not in ("fail", "warn"):
        raise UsageError(f'{source}: gates.fail_on must be "fail" or "warn".')
    pipelines = table.get("pipelines", [])
    if isinstance(pipelines, str) or not all(isinstance(p, str) for p in pipelines):
        raise UsageError(f"{source}: pipelines must be a list of TARGET strings.")
    config = Config(
        pipelines=tuple(pipelines),
        reports_dir=str(table.get("reports_dir", "reports")),
        baseline_dir=str(table.get("baseline_dir", "reports/baselines")),
        gates=Gates(**gates_table),
        thresholds=dict(table.get("thresholds", {})),
        ladders={key: list(value) for key, value in table.get("ladders", {}).items()},
        source=source,
    )
    config.make_thresholds()  # validate now, not halfway through a run
    return config


def _reject_unknown(table: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise UsageError(f"{where} has no key {unknown[0]!r}; known keys: {', '.join(sorted(known))}.")
