"""The value every check returns: findings plus the numbers it measured (for report metrics)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from influence_doctor.findings import Finding


@dataclass
class CheckOutcome:
    findings: list[Finding] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def extend(self, other: CheckOutcome) -> CheckOutcome:
        self.findings += other.findings
        self.metrics.update(other.metrics)
        return self


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def fmt(value: float) -> str:
    """Numbers in messages: short, and honest about inf/NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.3g}"
