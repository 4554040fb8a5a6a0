"""Checks on the trained model and its training curve: influence of a broken model is meaningless.

Minibatch losses are noisy (a single example's loss can swing tenfold from step to step), so every
judgement on the curve is held against the curve's own step-to-step noise, and only a measured
wrong result (a non-finite loss, a significant climb far above the lowest level, a regular swing that
makes no progress) is a `fail`. The limits are calibrated on generated healthy runs
(`influence_doctor.calibration`).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from influence_doctor.checks.measures import nonfinite_count
from influence_doctor.checks.outcome import CheckOutcome, dtype_name, fmt
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.findings import Finding, Severity

STAGE = "train"
MIN_OSCILLATION_STEPS = 8
"""Fewest second-half steps in which a swing can be told from noise at all."""
MIN_CYCLES = 2.5
"""Periods a swing must show in the second half before its regularity can be judged."""


@dataclass(frozen=True)
class SampleLoss:
    """The loss on a fixed sample of training examples, measured by the doctor before and after training
    (`runner.sample_loss`), with the evidence measured beside it where the model's size allowed."""

    untrained: float
    trained: float
    examples: int
    reference: float | None = None
    """The same loss for a freshly initialised copy of the model: the loss of knowing nothing."""
    uphill_cosine: float | None = None
    """cos(gradient of the sample loss at the start, the change training made to the parameters)."""

    @property
    def scale(self) -> float:
        """The loss on which "worse" is judged: the larger of the untrained and the fresh model's (a
        fine-tuned model starts near zero, where any ratio to its start is large and means nothing)."""
        if self.reference is not None and math.isfinite(self.reference) and self.reference > self.untrained:
            return self.reference
        return self.untrained


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
    """The most negative (biased, per-point) autocorrelation over lags 1..max_lag, and its lag.

    A cruder view of a swing than `periodicity`: white noise reaches -0.4 on short series, so the
    checks judge by `periodicity`."""
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


def autocorrelation(residuals: Sequence[float], lag: int) -> float:
    """Mean lagged product over mean square of zero-mean residuals, in [-1, 1].

    Normalised per pair (not per point), so that a perfectly periodic series scores ±1 at any length.
    """
    n = len(residuals)
    if not 0 < lag < n:
        return 0.0
    energy = sum(r * r for r in residuals) / n
    if energy == 0.0 or not math.isfinite(energy):
        return 0.0
    product = sum(residuals[i] * residuals[i + lag] for i in range(n - lag)) / (n - lag)
    return max(-1.0, min(1.0, product / energy))


def periodicity(values: Sequence[float], min_cycles: float) -> tuple[float, int]:
    """How regularly a detrended curve swings back and forth, and its half-period in steps.

    A swing with half-period k is anti-correlated with itself k steps later and correlated 2k steps
    later; the strength is the weaker of the two, min(−r(k), r(2k)), maximised over k with at least
    `min_cycles` whole periods in view. For a sinusoid plus white noise it is about the share of the
    variance the sinusoid carries; batch noise, whose autocorrelations scatter around zero, rarely
    reaches both signs at once.
    """
    residuals = detrend(values)
    lags = range(1, int(len(residuals) / (2.0 * min_cycles)) + 1)
    correlations = _autocorrelations(residuals, 2 * len(lags))
    best, best_lag = 0.0, 0
    for lag in lags:
        strength = min(-correlations[lag], correlations[2 * lag])
        if strength > best:
            best, best_lag = strength, lag
    return best, best_lag


def _autocorrelations(residuals: Sequence[float], max_lag: int) -> list[float]:
    """`autocorrelation(residuals, lag)` for lags 0..max_lag at once (vectorised: a loss curve has
    thousands of steps, and the doctor checks it on every run)."""
    import numpy as np

    r = np.asarray(residuals, dtype=np.float64)
    n = r.size
    out = [0.0] * (max_lag + 1)
    energy = float(r @ r) / n if n else 0.0
    if energy == 0.0 or not math.isfinite(energy):
        return out
    for lag in range(1, min(max_lag, n - 1) + 1):
        product = float(r[:-lag] @ r[lag:]) / (n - lag)
        out[lag] = max(-1.0, min(1.0, product / energy))
    return out


def step_noise(values: Sequence[float]) -> float:
    """Standard deviation of the per-step noise, from successive differences (√(mean Δ²/2)).

    Differences cancel a smooth trend, so this measures the scatter of single steps, not the descent.
    """
    if len(values) < 2:
        return 0.0
    return math.sqrt(sum((b - a) * (b - a) for a, b in itertools.pairwise(values)) / (2.0 * (len(values) - 1)))


def window_means(values: Sequence[float], width: int) -> list[float]:
    """Means of consecutive windows of `width` steps, the last one ending at the final step."""
    starts = list(range(0, len(values) - width + 1, width))
    if starts and starts[-1] != len(values) - width:
        starts.append(len(values) - width)
    return [sum(values[start : start + width]) / width for start in starts]


def _finding(check: str, severity: Severity, value: float, limit: float, cause: str | None, message: str) -> Finding:
    return Finding(
        check=check,
        stage=STAGE,
        subject="loss",
        severity=severity,
        value=value,
        limit=limit,
        cause=cause,
        message=message,
    )


def _significance(difference: float, standard_error: float) -> float:
    """difference / standard_error, where a noiseless curve makes any difference infinitely significant."""
    if standard_error > 0.0:
        return difference / standard_error
    return math.inf if difference > 0 else (-math.inf if difference < 0 else 0.0)


def check_loss_curve(
    loss: Sequence[float],
    validation_loss: Sequence[float | None],
    thresholds: Thresholds,
    sample: SampleLoss | None = None,
) -> CheckOutcome:
    """Finite, decreased, not diverging, not oscillating, and a sane train/validation gap.

    With a `sample` measurement the trained model's loss against the untrained one's decides whether
    training ended above where it started; the curve's first step (one minibatch, which with a batch of
    one may be a single easy example) is read for that only when nothing was measured. A climb the
    curve shows must also be material on the measured scale (`_settle_climbs`).
    """
    outcome = _check_curve(loss, validation_loss, thresholds, judge_start=sample is None)
    if sample is not None:
        measured = check_trained_loss(sample, thresholds, outcome.metrics)
        outcome.findings += measured.findings
        outcome.metrics.update(measured.metrics)
        _settle_climbs(outcome, sample, thresholds)
    return outcome


def _settle_climbs(outcome: CheckOutcome, sample: SampleLoss, thresholds: Thresholds) -> None:
    """A climb on the curve is divergence only when it undoes a material share of the loss scale
    (`SampleLoss.scale`): a converged model's loss that wanders from 0.0004 to 0.002 is "4× its lowest"
    and nothing at all beside the loss of an untrained model. Such a `fail` becomes a `warn`."""
    if not (math.isfinite(sample.trained) and sample.scale > 0.0):
        return
    level = sample.trained / sample.scale
    metrics = outcome.metrics
    shares = {
        "train.divergence": 1.0 - 1.0 / metrics["divergence_ratio"] if metrics.get("divergence_ratio", 0) > 0 else 0,
        "train.loss_decreased": 1.0 - metrics["initial_loss"] / metrics["final_loss"]
        if metrics.get("final_loss", 0) > 0
        else 0,
    }
    for index, finding in enumerate(outcome.findings):
        if finding.severity != "fail" or finding.check not in shares:
            continue
        share = max(0.0, shares[finding.check]) * level
        metrics["climb_share"] = share
        if share < thresholds.divergence_min_share:
            outcome.findings[index] = replace(
                finding,
                severity="warn",
                cause=None,
                message=f"{finding.message.rsplit(': ', 1)[0]}; the climb is {share:.2%} of an untrained model's "
                f"loss on {sample.examples} training examples, too small to call divergence (a fitted model "
                "wandering near zero loss).",
            )


def _check_curve(
    loss: Sequence[float], validation_loss: Sequence[float | None], thresholds: Thresholds, judge_start: bool
) -> CheckOutcome:
    outcome = CheckOutcome(metrics={"steps": len(loss)})
    if not loss:
        return outcome
    finite = [value for value in loss if math.isfinite(value)]
    if len(finite) < len(loss):
        first = next(index for index, value in enumerate(loss) if not math.isfinite(value))
        outcome.findings.append(
            _finding(
                "train.loss_finite",
                "fail",
                float(len(loss) - len(finite)),
                0.0,
                "training-diverged",
                f"The training loss became {loss[first]} at step {first}: training blew up.",
            )
        )
        return outcome
    loss = [float(value) for value in loss]
    width = min(
        len(loss), max(1, int(thresholds.loss_window_min_steps), int(len(loss) * thresholds.loss_window_fraction))
    )
    levels = window_means(loss, width)
    start, end = levels[0], levels[-1]
    noise = step_noise(loss)
    outcome.metrics.update(
        initial_loss=start, final_loss=end, peak_loss=max(levels), step_noise=noise, window_steps=width
    )
    if len(loss) >= 2 * width:
        _check_decrease(outcome, start, end, noise * math.sqrt(2.0 / width), thresholds)
    _check_divergence(outcome, loss, width, thresholds, judge_start)
    _check_oscillation(outcome, loss, thresholds)
    validation = [value for value in validation_loss if value is not None and math.isfinite(value)]
    if validation and max(start, validation[0]) > 0:
        scale = max(start, validation[0])
        _check_validation_gap(outcome, scale, end, noise / math.sqrt(width), validation[-1], thresholds)
    return outcome


def _check_decrease(outcome: CheckOutcome, start: float, end: float, error: float, thresholds: Thresholds) -> None:
    """The loss did not decrease: its last window sits measurably above its first (or equal, noiselessly)."""
    rise = _significance(end - start, error)
    outcome.metrics["loss_rise_significance"] = rise
    if end > start and rise >= thresholds.loss_rise_fail_significance:  # beyond any healthy run: it rose
        outcome.findings.append(
            _finding(
                "train.loss_decreased",
                "fail",
                end,
                start,
                "training-diverged",
                f"The loss rose from {fmt(start)} at the start to {fmt(end)} at the end, {fmt(rise)} standard "
                "errors of its step-to-step noise: training climbs instead of descending (a sign error, or a "
                "step too large).",
            )
        )
    elif end >= start and (error == 0.0 or rise >= thresholds.loss_rise_significance):
        outcome.findings.append(
            _finding(
                "train.loss_decreased",
                "warn",
                end,
                start,
                None,
                f"The loss did not decrease ({fmt(start)} at the start, {fmt(end)} at the end).",
            )
        )


def _check_divergence(
    outcome: CheckOutcome, loss: list[float], width: int, thresholds: Thresholds, judge_start: bool
) -> None:
    """The loss climbed far above its lowest level, by much more than its step-to-step noise.

    Positive losses are compared on a log scale (geometric window means): minibatch noise is
    multiplicative, a batch of easy examples can be ten times below a batch of hard ones.
    """
    logarithmic = all(value > 0.0 for value in loss)
    series = [math.log(value) for value in loss] if logarithmic else loss
    levels = window_means(series, width)
    lowest, final = min(levels), levels[-1]
    significance = _significance(final - lowest, step_noise(series) * math.sqrt(2.0 / width))
    if logarithmic:
        ratio = math.exp(min(final - lowest, 700.0))
        lowest_loss = math.exp(lowest)
    else:
        ratio = final / lowest if lowest > 0.0 else math.nan
        lowest_loss = lowest
    outcome.metrics.update(lowest_loss=lowest_loss, divergence_ratio=ratio, divergence_significance=significance)
    if _check_rise_from_start(outcome, loss, width, thresholds, judge_start):
        return  # one divergence finding per curve: ending far above the start says it already
    if ratio > thresholds.divergence_ratio and significance > thresholds.divergence_significance:
        outcome.findings.append(
            _finding(
                "train.divergence",
                "fail",
                ratio,
                thresholds.divergence_ratio,
                "training-diverged",
                f"The loss ended {ratio:.1f}× above its lowest level ({fmt(lowest_loss)}), a climb of "
                f"{fmt(significance)} standard errors of its step-to-step noise: training diverged.",
            )
        )


def _check_rise_from_start(
    outcome: CheckOutcome, loss: list[float], width: int, thresholds: Thresholds, judge: bool
) -> bool:
    """The loss ended far above the first loss recorded, beyond the noise of where it ended (measured
    always, judged only when `judge`: the doctor's own before/after measurement is better evidence).

    The first step is the untrained model's loss; a run that ends orders of magnitude above it blew up,
    however flat it is now (an explosion that settles on a plateau never climbs above its own lowest
    window). Judged on a log scale with robust statistics, because an exploded run's plateau is
    heavy-tailed (a classifier whose logits blew up scores 0 on some batches and 10⁴ on others): the
    last window's median against the first loss, in units of the second half's step-to-step scatter
    (median absolute difference), so neither the blow-up nor a few wild batches set the scale.
    """
    if any(value < 0.0 for value in loss):  # a negative loss (a log-density) has no ratio to its start
        return False
    positive = [value for value in loss if value > 0.0]
    floor = min(positive) if positive else 1e-300  # exact zeros (a saturated classifier) count as the smallest loss
    series = [math.log(max(value, floor)) for value in loss]
    first, final = series[0], statistics.median(series[-width:])
    tail = series[len(series) // 2 :]
    differences = [abs(b - a) for a, b in itertools.pairwise(tail)]
    noise = 1.4826 * statistics.median(differences) / math.sqrt(2.0) if differences else 0.0
    rise = final - first
    significance = _significance(rise, noise * math.sqrt(1.0 + math.pi / (2.0 * width)))
    ratio = math.exp(min(rise, 700.0))
    outcome.metrics.update(start_ratio=ratio, start_rise_significance=significance)
    diverged = judge and ratio > thresholds.start_rise_ratio and significance > thresholds.start_rise_significance
    if diverged:
        outcome.findings.append(
            _finding(
                "train.divergence",
                "fail",
                ratio,
                thresholds.start_rise_ratio,
                "training-diverged",
                f"The loss ended near {fmt(math.exp(final))}, {fmt(ratio)}× its first recorded value "
                f"({fmt(loss[0])}), {fmt(significance)} standard errors of its late step-to-step noise: "
                "training blew up.",
            )
        )
    return diverged


def check_trained_loss(
    sample: SampleLoss, thresholds: Thresholds, curve: Mapping[str, float] | None = None
) -> CheckOutcome:
    """The trained model's loss on a fixed sample of its own training examples against the untrained one's.

    Both are measured by the doctor on the same examples, in eval mode and without minibatch noise, so a
    rise is a measured wrong result of training rather than a reading of a noisy curve. A `fail` rests on
    the rise plus one more measurement that says what went wrong:

    - `train.trained_loss`: the trained model is worse than an untrained one (`SampleLoss.scale`) by more
      than any healthy run, or worse at all while the logged curve also climbed (without a fresh copy's
      loss the scale is the start alone, held to a wider limit);
    - `train.uphill`: the loss rose and training moved the parameters along the gradient of the loss at
      the start (a sign error: a loss maximised, or negated);
    - `train.explosion`: the loss ended no lower than it started and the curve peaked far above the
      untrained level on the way (`curve`'s `peak_loss` over its `final_loss`, times the measured ratio:
      the peak in units of the untrained loss, whatever unit the user's loop logs in).

    Otherwise a rise is a `warn` (fine-tuning a converged model with a fresh optimizer can lift a
    near-zero loss severalfold).
    """
    untrained, trained = sample.untrained, sample.trained
    curve = curve or {}
    outcome = CheckOutcome(metrics={"untrained_sample_loss": untrained, "trained_sample_loss": trained})
    on = f"on {sample.examples} of its training examples"
    if not math.isfinite(untrained) or untrained <= 0.0:
        return outcome  # no scale to hold the trained loss to (an untrained model with a non-finite loss)
    if not math.isfinite(trained):
        outcome.findings.append(
            _finding(
                "train.trained_loss",
                "fail",
                trained,
                untrained,
                "training-diverged",
                f"The trained model's loss {on} is {trained}, where the untrained model's was {fmt(untrained)}: "
                "training blew up.",
            )
        )
        return outcome
    ratio, level = trained / untrained, trained / sample.scale
    outcome.metrics.update(trained_loss_ratio=ratio, reference_loss_ratio=level)
    fresh = sample.scale != untrained
    comparison = (
        f"The trained model's loss {on} is {fmt(trained)}, {fmt(ratio)}× the untrained model's ({fmt(untrained)})"
    )
    climbed = curve.get("loss_rise_significance", -math.inf) >= thresholds.loss_rise_significance
    cosine = sample.uphill_cosine
    if cosine is not None:
        outcome.metrics["uphill_cosine"] = cosine
    height = None
    if curve.get("final_loss", 0.0) > 0.0 and math.isfinite(curve.get("peak_loss", math.nan)):
        height = curve["peak_loss"] / curve["final_loss"] * level
        outcome.metrics["explosion_height"] = height
    referenced = sample.reference is not None and math.isfinite(sample.reference)
    fail_ratio = thresholds.trained_loss_fail_ratio if referenced else thresholds.trained_loss_unreferenced_fail_ratio
    found = False
    if level >= fail_ratio or (level >= thresholds.trained_loss_warn_ratio and climbed):
        found = True
        worse = f", {fmt(level)}× a freshly initialised copy's ({fmt(sample.scale)})" if fresh else ""
        outcome.findings.append(
            _finding(
                "train.trained_loss",
                "fail",
                level,
                fail_ratio,
                "training-diverged",
                f"{comparison}{worse}{', and the logged loss climbed' if climbed else ''}: training made the "
                "model worse at its own data (it blew up, or climbed: a sign error, a step too large).",
            )
        )
    if ratio > 1.0 and cosine is not None and cosine >= thresholds.uphill_cosine:
        found = True
        outcome.findings.append(
            _finding(
                "train.uphill",
                "fail",
                cosine,
                thresholds.uphill_cosine,
                "training-diverged",
                f"{comparison}, and training moved the parameters uphill: the change it made has cosine "
                f"{cosine:+.2f} with the gradient of the loss at the start, where descent moves against it. "
                "The loss is maximised (a sign error: `maximize=True`, a negated loss).",
            )
        )
    if ratio >= 1.0 and height is not None and height >= thresholds.explosion_height:
        found = True
        outcome.findings.append(
            _finding(
                "train.explosion",
                "fail",
                height,
                thresholds.explosion_height,
                "training-diverged",
                f"{comparison}, and on the way the logged loss peaked at {fmt(height)}× the untrained level "
                "(its highest window against its last, times the measured ratio): training blew up and "
                "never recovered (a step far too large).",
            )
        )
    if not found and ratio >= thresholds.trained_loss_warn_ratio:
        outcome.findings.append(
            _finding(
                "train.trained_loss",
                "warn",
                ratio,
                thresholds.trained_loss_warn_ratio,
                None,
                f"{comparison}: training did not lower the loss on its own examples.",
            )
        )
    return outcome


def _check_oscillation(outcome: CheckOutcome, loss: list[float], thresholds: Thresholds) -> None:
    """A regular back-and-forth swing in the second half of training, comparable to the loss level.

    Regularity is judged as a significance, periodicity × √(steps): batch noise's autocorrelations
    scatter by about 1/√n, so on white noise this reads alike at any length (its 99.5th percentile is
    2.2-2.7 from 8 to 150 steps), where the periodicity alone reaches 0.8 on eight noisy steps.

    A `fail` when the second half is no better than the first (it oscillates instead of converging);
    a `warn` when the loss still descends underneath the swing.
    """
    middle = len(loss) // 2
    first, second = loss[:middle], loss[middle:]
    if len(second) < MIN_OSCILLATION_STEPS:
        return
    first_level, second_level = sum(first) / len(first), sum(second) / len(second)
    residuals = detrend(second)
    spread = math.sqrt(sum(r * r for r in residuals) / len(residuals))
    amplitude = 2 * math.sqrt(2) * spread / abs(second_level) if second_level else math.inf
    progress = (first_level - second_level) / abs(first_level) if first_level else 0.0
    strength, half_period = periodicity(second, MIN_CYCLES)
    significance = strength * math.sqrt(len(second))
    outcome.metrics.update(
        oscillation_periodicity=strength,
        oscillation_significance=significance,
        oscillation_period=2 * half_period,
        oscillation_amplitude=amplitude,
        second_half_progress=progress,
    )
    if significance < thresholds.oscillation_significance or not amplitude > thresholds.oscillation_min_amplitude:
        return
    swing = f"The loss swings by {amplitude:.0%} of its level every ~{2 * half_period} steps"
    halves = f"(mean {fmt(first_level)} in the first half of training, {fmt(second_level)} in the second)"
    if progress < thresholds.oscillation_max_progress:
        severity: Severity = "fail"
        message = f"{swing} and barely descends {halves}: it oscillates instead of converging."
    else:
        severity = "warn"
        message = f"{swing} while it descends {halves}: the learning rate may be near its stability limit."
    outcome.findings.append(
        _finding(
            "train.oscillation",
            severity,
            significance,
            thresholds.oscillation_significance,
            "training-oscillating",
            message,
        )
    )


def _check_validation_gap(
    outcome: CheckOutcome, scale: float, end: float, end_error: float, validation: float, thresholds: Thresholds
) -> None:
    """Validation loss far above the training loss, in units of the larger of the initial training loss
    and the first validation loss (stable when the training loss nears zero, and when training starts
    from a converged model); the training level is taken at its upper two-standard-error bound so that a
    few lucky minibatches at the end do not read as overfitting."""
    gap = (validation - (end + 2.0 * end_error)) / scale
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
                message=f"Validation loss ({fmt(validation)}) ends above the training loss ({fmt(end)}) by "
                f"{gap:.1f}× the initial loss: the model overfits.",
            )
        )


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
