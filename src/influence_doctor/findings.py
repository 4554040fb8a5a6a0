"""The Finding record: one measured fact about one stage, held to one limit (SPEC section 4)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Severity = Literal["info", "warn", "fail"]
SEVERITY_RANK: dict[str, int] = {"info": 0, "warn": 1, "fail": 2}

CAUSES: tuple[str, ...] = (
    "fp16-overflow",
    "low-precision-loss",
    "dtype-drift",
    "ill-conditioned",
    "rank-deficient",
    "asymmetric",
    "not-psd",
    "eigendecomposition-failed",
    "eigendecomposition-inaccurate",
    "tiny-damping",
    "score-outliers",
    "nonfinite-model",
    "training-diverged",
    "training-oscillating",
    "out-of-memory",
    "untracked-modules",
    "loss-not-summed",
    "batch-dependent",
    "nonfinite-examples",
)
"""The fixed vocabulary of root-cause tags."""


@dataclass(frozen=True)
class Finding:
    check: str  # dotted id, e.g. "covariance.finite"
    stage: str  # one of pipeline.STAGES
    subject: str  # module and factor, e.g. "layers.0.fc1/activation_covariance", or "" for the whole stage
    severity: Severity
    value: float | None  # what was measured
    limit: float | None  # the threshold it was held to
    cause: str | None  # a tag from CAUSES, or None
    message: str  # one plain sentence

    def __post_init__(self) -> None:
        if self.severity not in SEVERITY_RANK:
            raise ValueError(f"unknown severity {self.severity!r}")
        if self.cause is not None and self.cause not in CAUSES:
            raise ValueError(f"unknown cause tag {self.cause!r}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["value"] = json_number(self.value)
        data["limit"] = json_number(self.limit)
        return data


def json_number(value: float | None) -> float | None:
    """A plain float (or None) for the report; `report.strict_json` turns inf/NaN into null with a reason."""
    return None if value is None else float(value)


def worst_severity(findings: list[Finding]) -> str | None:
    return max((f.severity for f in findings), key=SEVERITY_RANK.__getitem__, default=None)
