"""Checks of the Task's contract with kronfluence, on the numbers `runner/contract.py` measured.

A batch's loss (and measurement) must equal the sum over its examples alone, value and gradient: a
ratio of 1/B at every batch size is a batch mean (`loss-not-summed`: every example scaled by 1/B, a
partial last batch differently from the others); anything else means an example's loss depends on the
rest of its batch (`batch-dependent`). Both are measured wrong results, so both are `fail`. Examples
whose loss alone is inf/NaN are named (`nonfinite-examples`): kronfluence scores them 0 without a word.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from influence_doctor.causes import BATCH_DEPENDENT, LOSS_NOT_SUMMED, NONFINITE_EXAMPLES
from influence_doctor.checks.outcome import CheckOutcome, fmt
from influence_doctor.checks.thresholds import Thresholds, eps
from influence_doctor.findings import fail

STAGE = "train"
LIKELY_MODULES = (
    "a normalisation over the batch that eval mode does not turn off (BatchNorm with track_running_stats=False; "
    "the measurement runs the model in eval mode, as kronfluence does), "
    "or a loss computed across the examples of a batch (in-batch negatives, a mean over all tokens of the batch)"
)
MAX_NAMED = 20
"""Examples named in a message; beyond it, the count."""


def tolerance(dtype_name: str, thresholds: Thresholds) -> float:
    """Relative difference a different summation order can leave: `contract_rtol_sqrt_eps`·√eps(dtype)."""
    dtype = getattr(torch, dtype_name, torch.float32)
    return thresholds.preflight.contract_rtol_sqrt_eps * math.sqrt(eps(dtype))


def reduction_of(probe: Mapping[str, Any], tol: float) -> str:
    """ "sum", "mean" or "neither" for one batch: its value (and gradient, when measured) against the sum
    of its examples' alone."""
    if "alone_error" in probe:
        return "neither"
    batch, total, size = probe["batch_value"], probe["alone_sum"], probe["batch"]
    if total == 0.0:
        return "sum" if batch == 0.0 else "neither"
    ratio = batch / total
    scale, residual = probe.get("gradient_scale"), probe.get("gradient_residual")
    gradient_clean = residual is None or (math.isfinite(residual) and residual <= tol)
    for name, expected in (("sum", 1.0), ("mean", 1.0 / size)):
        value_fits = abs(ratio / expected - 1.0) <= tol
        gradient_fits = scale is None or (math.isfinite(scale) and abs(scale / expected - 1.0) <= tol)
        if value_fits and gradient_fits and gradient_clean:
            return name
    return "neither"


def check_task_contract(record: Mapping[str, Any], thresholds: Thresholds) -> CheckOutcome:
    """`task.loss_reduction` (a mean, not a sum) and `task.batch_independence` (neither), per quantity."""
    outcome = CheckOutcome()
    probes: Sequence[Mapping[str, Any]] = record.get("probes") or []
    if not probes:
        return outcome
    tol = tolerance(record.get("dtype", "float32"), thresholds)
    outcome.metrics["contract_tolerance"] = tol
    for quantity in ("train loss", "measurement"):
        mine = [probe for probe in probes if probe["quantity"] == quantity]
        if not mine:
            continue
        kinds = [reduction_of(probe, tol) for probe in mine]
        ratios = [probe["batch_value"] / probe["alone_sum"] if probe.get("alone_sum") else math.nan for probe in mine]
        outcome.metrics[f"{quantity.replace(' ', '_')}_reduction"] = {
            str(probe["batch"]): kind for probe, kind in zip(mine, kinds, strict=True)
        }
        said = ", ".join(f"{fmt(r)}× on a batch of {p['batch']}" for p, r in zip(mine, ratios, strict=True))
        what = "training loss" if quantity == "train loss" else "measurement"
        if all(kind == "sum" for kind in kinds):
            continue
        if all(kind == "mean" for kind in kinds):
            outcome.findings.append(
                fail(
                    "task.loss_reduction",
                    f"The Task's {what} of a batch is the sum over its examples alone times 1/B ({said}): "
                    'it is a batch mean, and kronfluence needs a sum over examples; use reduction="sum".',
                    subject=quantity,
                    value=ratios[-1],
                    limit=1.0,
                    cause=LOSS_NOT_SUMMED,
                    stage=STAGE,
                )
            )
            continue
        worst = max(
            (probe for probe in mine),
            key=lambda probe: (
                abs(probe["batch_value"] / probe["alone_sum"] - 1.0) if probe.get("alone_sum") else math.inf
            ),
        )
        gradient = worst.get("gradient_residual")
        gradient_text = f"; the gradient differs by {fmt(gradient)} beyond any scale" if gradient else ""
        if "alone_error" in worst:
            said = f"a batch of {worst['batch']} runs, an example alone raises {worst['alone_error']}"
        outcome.findings.append(
            fail(
                "task.batch_independence",
                f"The Task's {what} of a batch is neither the sum nor the mean of its examples' alone "
                f"({said}{gradient_text}): an example's loss depends on the rest of its batch. Likely: "
                f"{LIKELY_MODULES}; no setting of kronfluence can undo it.",
                subject=quantity,
                value=worst["batch_value"] / worst["alone_sum"] if worst.get("alone_sum") else math.nan,
                limit=1.0,
                cause=BATCH_DEPENDENT,
                stage=STAGE,
            )
        )
    return outcome


def check_examples_finite(train: Mapping[str, Any] | None, queries: Mapping[str, Any] | None) -> CheckOutcome:
    """`task.examples_finite`: examples whose loss (queries: measurement) alone is inf/NaN, named."""
    outcome = CheckOutcome()
    for subject, record, what in (("train", train, "training examples"), ("query", queries, "queries")):
        if not record or "nonfinite" not in record:
            continue
        bad = sorted(record["nonfinite"])
        outcome.metrics[f"{subject}_examples_checked"] = record.get("checked", 0)
        if not bad:
            continue
        named = ", ".join(map(str, bad[:MAX_NAMED])) + (
            f" and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else ""
        )
        quantity = "loss" if subject == "train" else "measurement"
        outcome.findings.append(
            fail(
                "task.examples_finite",
                f"{len(bad)} of {record.get('checked', 0)} {what} have an inf/NaN {quantity} alone "
                f"(indices {named}); kronfluence gives them zero gradient and scores them 0. A loss averaged over "
                "an empty mask is 0/0: sum it instead (a sum over no tokens is 0), or leave these examples out.",
                subject=subject,
                value=float(len(bad)),
                limit=0.0,
                cause=NONFINITE_EXAMPLES,
                stage=STAGE,
            )
        )
    return outcome
