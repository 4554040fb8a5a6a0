"""Verdicts that rest on two measurements: a bound the float64 re-run refutes, the Task's contract with its
measured effect on the rankings, a fix held to its fidelity bar. Pure: findings and numbers in, findings out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from influence_doctor.checks.outcome import CheckOutcome
from influence_doctor.findings import Finding, warn

REFUTABLE_CHECKS = (".condition", ".effective_rank", ".dead_units")
"""Bound-based hypotheses (conditioning, rank) that a float64 agreement shows to be harmless."""

FACTOR_PRECISION_CHECKS = frozenset({"covariance.precision", "lambda.precision"})
"""A factor's error against float64: it matters only through the scores, so when the user's rankings
agree with float64 it is `info`, not a warning."""

CONTRACT_CHECKS = frozenset({"task.loss_reduction", "task.batch_independence"})


def refute_bounds(findings: list[Finding], worst_spearman: float) -> list[Finding]:
    """The float64 re-run agrees (its worst median per-query Spearman over the score kinds is
    `worst_spearman`): the conditioning and rank warnings were hypotheses, and they are refuted; a factor's
    own distance from float64 does not reach the rankings. They stay as `info`, saying why."""
    note = f" — refuted: float64 at the same damping agrees (median per-query Spearman {worst_spearman:.4f})."
    unseen = (
        f" — the scores do not show it: float64 at the same damping ranks alike (median Spearman {worst_spearman:.4f})."
    )
    return [
        dataclasses.replace(f, severity="info", message=f.message.rstrip(".") + note)
        if f.severity == "warn" and f.check.endswith(REFUTABLE_CHECKS)
        else dataclasses.replace(f, severity="info", message=f.message.rstrip(".") + unseen)
        if f.severity == "warn" and f.check in FACTOR_PRECISION_CHECKS
        else f
        for f in findings
    ]


def explain_recounted_covariance(findings: list[Finding], audit: Any, thresholds: Any) -> list[Finding]:
    """A module whose activation covariance counted other examples than its gradient covariance, while the
    covariance as a sum over its count agrees with plain forward passes (the hooks audit): a forward run
    again (non-reentrant activation checkpointing) doubles the sum and the count alike, which changes nothing
    kronfluence computes from them. The warning stays an `info`, saying so."""
    from influence_doctor.checks.hooks import hooks_tolerance

    if audit is None or audit.skipped:
        return findings
    tolerance = hooks_tolerance(audit.dtype, thresholds)
    result = []
    for f in findings:
        error = audit.factors.get(f.subject) if f.check == "covariance.examples_equal" else None
        if f.severity == "warn" and error is not None and error <= tolerance:
            note = (
                f" — the covariance as a sum over its count agrees with plain forward passes ({error:.1e}): the "
                "forward ran again (e.g. activation checkpointing), counting the sum and the count alike."
            )
            f = dataclasses.replace(f, severity="info", message=f.message.rstrip(".") + note)
        result.append(f)
    return result


def with_measured_ties(findings: list[Finding], audit: Any) -> list[Finding]:
    """The pre-flight's tied weight, once the hooks audit measured the share of the gradient the hooks see
    (`hooks.tied`, a warn of its own): the pre-flight's hypothesis stays as an `info` pointing to it."""
    if audit is None or audit.skipped:
        return findings
    result = []
    for f in findings:
        measured = audit.tied.get(f.subject) if f.check == "preflight.tied_weights" else None
        if f.severity == "warn" and measured is not None:
            note = f"; measured against autograd: the hooks see {measured[1]:.0%} of its gradient (hooks.tied)."
            f = dataclasses.replace(f, severity="info", message=f.message.rstrip(".") + note)
        result.append(f)
    return result


def with_measured_effect(findings: list[Finding], effect: str) -> list[Finding]:
    """The Task's contract findings with the measured effect of a Task that is not a sum on the rankings
    (`effect`: "measured on N examples: ... rankings at train batch sizes B and B' agree at ...")."""
    return [
        dataclasses.replace(f, message=f.message.rstrip(".") + f"; {effect}.")
        if f.check in CONTRACT_CHECKS and "measured on" not in f.message
        else f
        for f in findings
    ]


def with_frozen_effect(findings: list[Finding], effect: str) -> list[Finding]:
    """The frozen-tracked warning with the measured effect of tracking only the trained modules."""
    return [
        dataclasses.replace(f, message=f.message.rstrip(".") + f". {effect}.")
        if f.check == "train.frozen_tracked" and effect not in f.message
        else f
        for f in findings
    ]


def check_fix_fidelity(stage: str, fix: Mapping[str, object]) -> CheckOutcome:
    """`scores.fix_fidelity` (warn, which the gate of that name fails): a fix that moved the rankings further
    than `min_fix_spearman` allows is worse than the problem it healed, or close to it."""
    outcome = CheckOutcome()
    if not fix.get("below_limit"):
        return outcome
    median, limit = float(fix.get("median_spearman") or math.nan), float(fix["limit"])  # type: ignore[arg-type]
    if math.isnan(median):  # an applied fix whose rankings could not be compared: never a pass
        outcome.findings.append(
            warn(
                "scores.fix_fidelity",
                f"The fix's rankings could not be compared with {fix.get('reference')!r} (no finite Spearman): "
                f"unmeasured, it is held below {limit:g}, advice and not a cure.",
                stage=stage,
                limit=limit,
            )
        )
        return outcome
    outcome.findings.append(
        warn(
            "scores.fix_fidelity",
            f"The fix moved the rankings to median per-query Spearman {median:.3f} against {fix['reference']!r}, "
            f"below {limit:g}: a fix worse than the problem is no cure.",
            stage=stage,
            value=median,
            limit=limit,
        )
    )
    return outcome
