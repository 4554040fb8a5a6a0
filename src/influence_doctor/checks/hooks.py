"""The hooks against autograd, judged (the measurement is `audit/hooks.py`).

A module whose gradient inner products, activation covariance or recomputed scores disagree with the
model's own computation beyond √eps of the model's dtype is a measured `fail` (`hooks.gradients`,
`hooks.factors`, `hooks.scores`). When it runs more than once per forward and the hooks agree with
autograd of its last call alone, the cause is measured too (`shared-parameters`). A weight tied to
another module's is a `warn` with the share of the parameter's gradient the hooks see: the module's own
use is computed right, the other use is not in the scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from influence_doctor.causes import SHARED_PARAMETERS
from influence_doctor.checks.outcome import CheckOutcome, fmt
from influence_doctor.checks.thresholds import Thresholds, eps
from influence_doctor.findings import fail, info, warn

HOOK_CHECKS = ("hooks.gradients", "hooks.factors", "hooks.scores")
"""The measured failures of the audit (each a symptom of kind `hooks`)."""


@dataclass
class HooksAudit:
    """What the hooks audit measured, relative errors per module (measured by `audit/hooks.py`)."""

    examples: int = 0
    queries: int = 0
    dtype: torch.dtype = torch.float32  # the dtype kronfluence's forward ran in (the model's)
    gradients: dict[str, float] = field(default_factory=dict)
    factors: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)  # module → forward calls per example (every module)
    last_call: dict[str, float] = field(default_factory=dict)  # module called >1 times → hooks vs its last call
    tied: dict[str, tuple[str, float]] = field(default_factory=dict)  # module → (the other owner, share seen)
    left_out: dict[str, str] = field(default_factory=dict)  # module → why it was not audited
    skipped: str = ""  # why nothing was audited
    seconds: float = 0.0

    @property
    def worst(self) -> float:
        values = [*self.gradients.values(), *self.factors.values(), *self.scores.values()]
        finite = [value for value in values if not math.isnan(value)]
        return max(finite, default=math.nan)

    def summary(self) -> dict[str, Any]:
        """report.json's fidelity.hooks."""
        if self.skipped:
            return {"skipped": self.skipped, "seconds": self.seconds}
        summary: dict[str, Any] = {
            "examples": self.examples,
            "queries": self.queries,
            "gradients": dict(self.gradients),
            "factors": dict(self.factors),
            "scores": dict(self.scores),
            "worst": self.worst,
            "seconds": self.seconds,
        }
        if repeated := {module: count for module, count in self.calls.items() if count > 1}:
            summary["calls"] = repeated
            summary["last_call"] = dict(self.last_call)
        if self.tied:
            summary["tied"] = {module: {"to": other, "share": share} for module, (other, share) in self.tied.items()}
        if self.left_out:
            summary["left_out"] = dict(self.left_out)
        return summary


def hooks_tolerance(dtype: torch.dtype, thresholds: Thresholds) -> float:
    """The relative error beyond which the hooks disagree with autograd for a model in `dtype`."""
    return thresholds.precision.hooks_error_sqrt_eps * math.sqrt(eps(dtype))


def failing_modules(audit: Any, thresholds: Thresholds) -> dict[str, float]:
    """module → its worst relative error beyond the tolerance (gradients, factors or scores)."""
    tolerance = hooks_tolerance(audit.dtype, thresholds)
    worst: dict[str, float] = {}
    for errors in (audit.gradients, audit.factors, audit.scores):
        for module, error in errors.items():
            if error > tolerance:  # NaN: a non-finite reference (a broken model) judges nothing
                worst[module] = max(worst.get(module, 0.0), error)
    return worst


def check_hooks(audit: Any, stage: str, thresholds: Thresholds) -> CheckOutcome:
    """Findings of one audit, on the first score stage (the scores are what a wrong hook makes wrong)."""
    outcome = CheckOutcome()
    if audit is None or audit.skipped:
        return outcome
    tolerance = hooks_tolerance(audit.dtype, thresholds)
    dtype = str(audit.dtype).replace("torch.", "")
    wrong_gradients = set()
    for module, error in audit.gradients.items():
        if not error > tolerance:  # within it, or NaN: a non-finite reference (a broken model) judges nothing
            continue
        wrong_gradients.add(module)
        calls = audit.calls.get(module, 1)
        last = audit.last_call.get(module)
        message = (
            f"{module}'s per-example gradient inner products as kronfluence's hooks compute them are off by "
            f"{error:.0%} against autograd on {audit.examples} examples and {audit.queries} queries"
        )
        cause = None
        if calls > 1 and last is not None and last <= tolerance:
            message += (
                f": it runs {calls} times per forward, and the hooks agree with autograd of its last call alone "
                f"({fmt(last)}), so they see one call of {calls}"
            )
            cause = SHARED_PARAMETERS
        elif calls > 1:
            message += f": it runs {calls} times per forward"
        outcome.findings.append(
            fail(
                "hooks.gradients", message + ".", subject=module, value=error, limit=tolerance, cause=cause, stage=stage
            )
        )
    for module, error in audit.factors.items():
        if error > tolerance and module not in wrong_gradients:
            outcome.findings.append(
                fail(
                    "hooks.factors",
                    f"{module}'s activation covariance (sum over count) differs from plain forward passes by "
                    f"{fmt(error)} (tolerance {fmt(tolerance)}, √eps of {dtype}).",
                    subject=module,
                    value=error,
                    limit=tolerance,
                    stage=stage,
                )
            )
    for module, error in audit.scores.items():  # a sum over modules: a wrong module's gradients explain it
        if error > tolerance and module not in wrong_gradients and not (module == "all_modules" and wrong_gradients):
            outcome.findings.append(
                fail(
                    "hooks.scores",
                    f"The scores recomputed from kronfluence's own factors with autograd's gradients ({module}) "
                    f"differ from kronfluence's by {fmt(error)} of the largest score they could give (tolerance "
                    f"{fmt(tolerance)}).",
                    subject=module,
                    value=error,
                    limit=tolerance,
                    stage=stage,
                )
            )
    for module, (other, share) in audit.tied.items():
        outcome.findings.append(
            warn(
                "hooks.tied",
                f"{module}'s weight is also {other}'s: the hooks see its own use, {share:.0%} of the parameter's "
                f"gradient (median over {audit.examples} examples); the rest flows through {other}, which the scores "
                "leave out.",
                subject=module,
                value=share,
                cause=SHARED_PARAMETERS,
                stage=stage,
            )
        )
    if audit.left_out:
        names = ", ".join(sorted(audit.left_out))
        outcome.findings.append(
            info("hooks.left_out", f"Not audited against autograd (too large for its budget): {names}.", stage=stage)
        )
    outcome.metrics = {"worst": audit.worst, "tolerance": tolerance, "modules": len(audit.gradients)}
    return outcome
