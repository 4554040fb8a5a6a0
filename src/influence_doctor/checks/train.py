"""Checks on the trained model and its training curve: influence of a broken model is meaningless."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch

from influence_doctor.checks.measures import nonfinite_count
from influence_doctor.checks.outcome import CheckOutcome, dtype_name, fmt
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.findings import Finding

STAGE = "train"


def smooth(values: Sequence[float], span: int) -> list[float]:
    """Exponential moving average with the given span (α = 2/(span+1)); the curve a person would see."""
    alpha = 2.0 / (max(span, 1) + 1.0)
    smoothed: list[float] = []
    for value in values:
        smoothed.append(value if not smoothed else alpha * value + (1 - alpha) * smoothed[-1])
    return smoothed


def sign_change_share(values: Sequence[float]) -> float:
    """Share of consecutive steps where the curve reverses direction."""
    steps = [b - a for a, b in itertools.pairwise(values) if b != a]
    if len(steps) < 2:
        return 0.0
    changes = sum(1 for a, b in itertools.pairwise(steps) if (a > 0) != (b > 0))
    return changes / (len(steps) - 1)


def check_loss_curve(
    loss: Sequence[float], validation_loss: Sequence[float | None], thresholds: Thresholds
) -> CheckOutcome:
    """Finite, decreased, not diverging, not oscillating, and a sane train/validation gap."""
    outcome = CheckOutcome(metrics={"steps": len(loss)})
    if not loss:
        return outcome
    finite = [value for value in loss if math.isfinite(value)]
    if len(finite) < len(loss):
        first = next(index for index, value in enumerate(loss) if not math.isfinite(value))
        outcome.findings.append(
            Finding(
                check="train.loss_finite",
                stage=STAGE,
                subject="loss",
                severity="fail",
                value=float(len(loss) - len(finite)),
                limit=0.0,
                cause="training-diverged",
                message=f"The training loss became {loss[first]} at step {first}: training blew up.",
            )
        )
        return outcome
    window = max(1, int(len(loss) * thresholds.loss_window_fraction))
    start, end = sum(loss[:window]) / window, sum(loss[-window:]) / window
    smoothed = smooth(loss, span=window)
    lowest = min(smoothed)
    outcome.metrics.update(initial_loss=start, final_loss=end, lowest_smoothed_loss=lowest)
    if len(loss) >= 2 * window and end >= start:
        outcome.findings.append(
            Finding(
                check="train.loss_decreased",
                stage=STAGE,
                subject="loss",
                severity="warn",
                value=end,
                limit=start,
                cause=None,
                message=f"The loss did not decrease ({fmt(start)} at the start, {fmt(end)} at the end).",
            )
        )
    if lowest > 0 and smoothed[-1] > thresholds.divergence_ratio * lowest:
        outcome.findings.append(
            Finding(
                check="train.divergence",
                stage=STAGE,
                subject="loss",
                severity="fail",
                value=smoothed[-1] / lowest,
                limit=thresholds.divergence_ratio,
                cause="training-diverged",
                message=f"The smoothed loss ended {smoothed[-1] / lowest:.1f}× above its lowest point: "
                "training diverged.",
            )
        )
    tail = smoothed[len(smoothed) // 2 :]
    share = sign_change_share(tail)
    level = sum(abs(v) for v in tail) / len(tail) if tail else 0.0
    amplitude = (max(tail) - min(tail)) / level if tail and level > 0 else 0.0
    outcome.metrics.update(sign_change_share=share, oscillation_amplitude=amplitude)
    if (
        len(tail) >= 8
        and share > thresholds.oscillation_max_sign_changes
        and amplitude > thresholds.oscillation_min_amplitude
    ):
        outcome.findings.append(
            Finding(
                check="train.oscillation",
                stage=STAGE,
                subject="loss",
                severity="fail",
                value=share,
                limit=thresholds.oscillation_max_sign_changes,
                cause="training-oscillating",
                message=f"The smoothed loss reverses direction on {share:.0%} of its last half with swings of "
                f"{amplitude:.0%} of its level: training is oscillating, not converging.",
            )
        )
    validation = [value for value in validation_loss if value is not None and math.isfinite(value)]
    if validation and end > 0:
        gap = validation[-1] / end - 1.0
        outcome.metrics["generalization_gap"] = gap
        if gap > thresholds.max_generalization_gap:
            outcome.findings.append(
                Finding(
                    check="train.validation_gap",
                    stage=STAGE,
                    subject="validation_loss",
                    severity="warn",
                    value=gap,
                    limit=thresholds.max_generalization_gap,
                    cause=None,
                    message=f"Validation loss is {gap:.0%} above training loss: the model overfits.",
                )
            )
    return outcome


def check_parameters(parameters: Mapping[str, torch.Tensor]) -> CheckOutcome:
    """Parameters must be finite; fp16 weights without fp32 master copies lose updates silently."""
    outcome = CheckOutcome()
    broken = {name: nonfinite_count(tensor) for name, tensor in parameters.items()}
    broken = {name: count for name, count in broken.items() if count}
    dtypes = sorted({dtype_name(tensor.dtype) for tensor in parameters.values()})
    outcome.metrics.update(nonfinite_parameters=sum(broken.values()), parameter_dtypes=dtypes)
    if broken:
        first = next(iter(broken))
        outcome.findings.append(
            Finding(
                check="train.parameters_finite",
                stage=STAGE,
                subject=first,
                severity="fail",
                value=float(sum(broken.values())),
                limit=0.0,
                cause="nonfinite-model",
                message=f"{sum(broken.values())} parameter values are inf/NaN, starting in {first}: "
                "the model itself is broken.",
            )
        )
    if "float16" in dtypes:
        outcome.findings.append(
            Finding(
                check="train.parameter_dtype",
                stage=STAGE,
                subject="parameters",
                severity="warn",
                value=None,
                limit=None,
                cause="low-precision-loss",
                message="Some parameters are float16: gradients and factors inherit its narrow range.",
            )
        )
    return outcome
