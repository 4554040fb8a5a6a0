"""The Finding record: one measured fact about one stage, held to one limit (SPEC section 4).

Checks build findings with `fail`, `warn` and `info`: the severity is the constructor's name, the stage
follows from the check's dotted id where that names a stage, and a suspected cause is a row of
`causes.py` (or its tag).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from influence_doctor.causes import TAGS, Cause
from influence_doctor.pipeline import STAGES

Severity = Literal["info", "warn", "fail"]
SEVERITY_RANK: dict[str, int] = {"info": 0, "warn": 1, "fail": 2}


@dataclass(frozen=True)
class Finding:
    check: str  # dotted id, e.g. "covariance.finite"
    stage: str  # one of pipeline.STAGES
    subject: str  # module and factor, e.g. "layers.0.fc1/activation_covariance", or "" for the whole stage
    severity: Severity
    value: float | None  # what was measured
    limit: float | None  # the threshold it was held to
    cause: str | None  # a tag of causes.TAGS, or None
    message: str  # one plain sentence

    def __post_init__(self) -> None:
        if self.severity not in SEVERITY_RANK:
            raise ValueError(f"unknown severity {self.severity!r}")
        if self.cause is not None and self.cause not in TAGS:
            raise ValueError(f"unknown cause tag {self.cause!r}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["value"] = json_number(self.value)
        data["limit"] = json_number(self.limit)
        return data


def finding(
    severity: Severity,
    check: str,
    message: str,
    *,
    subject: str = "",
    value: float | None = None,
    limit: float | None = None,
    cause: Cause | str | None = None,
    stage: str | None = None,
) -> Finding:
    """A Finding; `stage` defaults to the check's first part when that is a stage (`covariance.finite`)."""
    stage = stage or check.partition(".")[0]
    if stage not in STAGES:
        raise ValueError(f"check {check!r} names no stage: give stage=")
    tag = cause.tag if isinstance(cause, Cause) else cause
    return Finding(check, stage, subject, severity, value, limit, tag, message)


def fail(check: str, message: str, **fields: Any) -> Finding:
    """A measured wrong result."""
    return finding("fail", check, message, **fields)


def warn(check: str, message: str, **fields: Any) -> Finding:
    """A hypothesis (a bound, a heuristic, a projection) until an experiment confirms it."""
    return finding("warn", check, message, **fields)


def info(check: str, message: str, **fields: Any) -> Finding:
    """A number worth knowing that judges nothing."""
    return finding("info", check, message, **fields)


def json_number(value: float | None) -> float | None:
    """A plain float (or None) for the report; `report.strict_json` turns inf/NaN into null with a reason."""
    return None if value is None else float(value)


def worst_severity(findings: list[Finding]) -> str | None:
    return max((f.severity for f in findings), key=SEVERITY_RANK.__getitem__, default=None)
