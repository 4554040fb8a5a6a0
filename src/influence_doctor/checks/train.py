"""Checks on the trained model and its training curve: influence of a broken model is meaningless."""

from __future__ import annotations

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


def detrend(values: Sequence[float]) -> list[float]:
    """Residuals of a least-squares line: what is left of a curve once its steady trend is removed."""
    n = len(values)
    if n < 2:
        return [0.0] * n
    mean_x, mean_y = (n - 1) / 2.0, sum(values) / n
    sxx = sum((i - mean_x) ** 2 for i in range(n))
    slope = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values)) / sxx
    return [v - (mean_y + slope * (i - mean_x)) for i, v in enumerate(values)]


def lowest_autocorrelation(values: Sequence[float], max_lag: int) -> tuple[float, int]:
    """The most negative autocorrelation over lags 1..max_lag, and its lag.

    A loss that swings back and forth is anti-correlated with itself half a period later; batch noise
    around a trend is not (its autocorrelations stay near zero).
    """
    n = len(values)
    mean = sum(values) / n if n else 0.0
    centred = [v - mean for v in values]
    energy = sum(c * c for c in centred)
    best, best_lag = 0.0, 0
    if energy == 0.0:
        return best, best_lag
    for lag in range(1, min(max_lag, n - 1) + 1):
        value = sum(centred[i] * centred[i + lag] for i in range(n - lag)) / energy
        if value < best:
            best, best_lag = value, lag
    return best, best_lag


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
    tail = detrend(loss[len(loss) // 2 :])
    correlation, lag = lowest_autocorrelation(tail, max_lag=max(1, len(tail) // 4))
    level = abs(end) if end else 0.0
    spread = math.sqrt(sum(v * v for v in tail) / len(tail)) if tail else 0.0
    amplitude = 2 * math.sqrt(2) * spread / level if level > 0 else 0.0
    outcome.metrics.update(lowest_autocorrelation=correlation, oscillation_lag=lag, oscillation_amplitude=amplitude)
    if (
        len(tail) >= 8
        and correlation < thresholds.oscillation_autocorrelation
        and amplitude > thresholds.oscillation_min_amplitude
    ):
        outcome.findings.append(
            Finding(
                check="train.oscillation",
                stage=STAGE,
                subject="loss",
                severity="fail",
                value=correlation,
                limit=thresholds.oscillation_autocorrelation,
                cause="training-oscillating",
                message=f"The loss swings back and forth every ~{2 * lag} steps by {amplitude:.0%} of its level "
                "in the second half of training: it oscillates instead of converging.",
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
