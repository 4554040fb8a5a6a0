"""Training-curve and parameter checks on constructed loss curves."""

from __future__ import annotations

import math
import random

import pytest
import torch

from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.checks.train import (
    check_loss_curve,
    check_parameters,
    detrend,
    lowest_autocorrelation,
    smooth,
)
from tests.checks.helpers import assert_valid, checks_of, only

T = Thresholds()


def _decaying(n: int = 200) -> list[float]:
    return [0.1 + 2.0 * math.exp(-t / 30) for t in range(n)]


def _oscillating(n: int, period: int = 4, amplitude: float = 0.8) -> list[float]:
    return [1.0 + amplitude * math.sin(2 * math.pi * t / period) for t in range(n)]


def test_smooth_is_an_exact_ema():
    assert smooth([0.0, 3.0, 3.0], span=3) == [0.0, 1.5, 2.25]  # α = 2/(3+1) = 0.5
    assert smooth([4.0, 1.0, 7.0], span=1) == [4.0, 1.0, 7.0]  # α = 1: no smoothing
    assert smooth([4.0, 1.0], span=0) == [4.0, 1.0]
    assert smooth([], span=5) == []
    assert smooth([9.0, 0.0], span=9) == [9.0, 9.0 * 0.8]


def test_detrend_removes_a_line_exactly():
    assert detrend([1.0, 3.0, 5.0, 7.0]) == pytest.approx([0.0, 0.0, 0.0, 0.0])
    assert detrend([0.0, 1.0, 0.0, 1.0]) == pytest.approx([-0.2, 0.6, -0.6, 0.2])  # slope 0.2 through 0.5
    assert detrend([2.0]) == [0.0]


def test_lowest_autocorrelation_exact():
    value, lag = lowest_autocorrelation([1.0, -1.0, 1.0, -1.0], max_lag=2)
    assert lag == 1
    assert value == pytest.approx(-0.75)  # (−1−1−1)/4
    assert lowest_autocorrelation([5.0, 5.0, 5.0], max_lag=2) == (0.0, 0)


def test_smooth_decreasing_curve_has_no_findings():
    loss = _decaying()
    outcome = check_loss_curve(loss, [], T)
    assert outcome.findings == []
    assert outcome.metrics["steps"] == 200
    assert outcome.metrics["initial_loss"] == pytest.approx(sum(loss[:20]) / 20)
    assert outcome.metrics["final_loss"] == pytest.approx(sum(loss[-20:]) / 20)
    assert outcome.metrics["lowest_autocorrelation"] > T.oscillation_autocorrelation


@pytest.mark.parametrize("bad", [math.inf, math.nan, -math.inf])
def test_nonfinite_loss_means_training_diverged(bad):
    loss = _decaying(100)
    loss[37] = bad
    loss[60] = math.nan
    outcome = check_loss_curve(loss, [], T)
    finding = only(outcome, "train.loss_finite")
    assert finding.severity == "fail"
    assert finding.cause == "training-diverged"
    assert finding.value == 2.0
    assert "step 37" in finding.message
    assert len(outcome.findings) == 1


def test_decrease_then_climb_to_five_times_the_minimum_diverges():
    loss = [1.0 - 0.009 * t for t in range(100)] + [0.1 + 0.005 * t for t in range(1, 101)]
    outcome = check_loss_curve(loss, [], T)
    finding = only(outcome, "train.divergence")
    assert finding.severity == "fail"
    assert finding.cause == "training-diverged"
    smoothed = smooth(loss, span=20)
    assert finding.value == pytest.approx(smoothed[-1] / min(smoothed))
    assert finding.value > 3.0
    assert outcome.metrics["lowest_smoothed_loss"] == min(smoothed)


def test_a_mild_rebound_is_not_divergence():
    loss = [1.0 - 0.009 * t for t in range(100)] + [0.1 + 0.001 * t for t in range(1, 101)]  # ends at 2× min
    assert "train.divergence" not in checks_of(check_loss_curve(loss, [], T))


def test_loss_that_never_decreased_warns():
    finding = only(check_loss_curve([1.0 + 0.001 * t for t in range(50)], [], T), "train.loss_decreased")
    assert finding.severity == "warn"
    assert finding.value > finding.limit


@pytest.mark.parametrize("steps", [20, 40, 60])
def test_large_oscillation_is_flagged_on_short_runs(steps):
    outcome = check_loss_curve(_oscillating(steps), [], T)
    finding = only(outcome, "train.oscillation")
    assert finding.severity == "fail"
    assert finding.cause == "training-oscillating"
    assert finding.value < T.oscillation_autocorrelation
    assert outcome.metrics["oscillation_amplitude"] > T.oscillation_min_amplitude


def test_large_oscillation_is_flagged_on_long_runs():
    assert only(check_loss_curve(_oscillating(200), [], T), "train.oscillation").cause == "training-oscillating"


def test_small_noise_at_convergence_is_not_oscillation():
    rng = random.Random(0)
    converged = [0.1 + 2.0 * math.exp(-t / 10) for t in range(100)]  # within 1e-4 of 0.1 by step 100
    loss = converged + [0.1 * (1 + 0.01 * rng.uniform(-1, 1)) for _ in range(100)]
    outcome = check_loss_curve(loss, [], T)
    assert "train.oscillation" not in checks_of(outcome)
    assert outcome.metrics["oscillation_amplitude"] < T.oscillation_min_amplitude


@pytest.mark.parametrize("seed", range(10))
def test_noisy_but_converging_training_is_not_oscillation(seed):
    rng = random.Random(seed)
    loss = [(0.1 + 2.0 * math.exp(-t / 20)) * (1 + 0.25 * rng.gauss(0, 1)) for t in range(200)]
    assert min(loss) > 0
    assert "train.oscillation" not in checks_of(check_loss_curve(loss, [], T))


def test_validation_gap_warns():
    loss = _decaying()
    end = sum(loss[-20:]) / 20
    finding = only(check_loss_curve(loss, [None, 0.5, None, 0.35, None], T), "train.validation_gap")
    assert finding.severity == "warn"
    assert finding.subject == "validation_loss"
    assert finding.value == pytest.approx(0.35 / end - 1.0)
    assert check_loss_curve(loss, [0.15], T).metrics["generalization_gap"] == pytest.approx(0.15 / end - 1.0)
    assert check_loss_curve(loss, [0.15], T).findings == []


def test_validation_of_only_none_or_nonfinite_is_ignored():
    outcome = check_loss_curve(_decaying(), [None, math.nan, math.inf], T)
    assert "generalization_gap" not in outcome.metrics


def test_empty_loss_curve():
    assert check_loss_curve([], [], T).metrics == {"steps": 0}


def test_nonfinite_parameter_is_a_nonfinite_model():
    broken = torch.ones(3, 3)
    broken[0, 1] = math.nan
    broken[2, 2] = math.inf
    params = {"fc1.weight": torch.ones(3), "fc2.weight": broken, "fc3.weight": torch.tensor([math.nan])}
    outcome = check_parameters(params)
    finding = only(outcome, "train.parameters_finite")
    assert finding.severity == "fail"
    assert finding.cause == "nonfinite-model"
    assert finding.subject == "fc2.weight"  # the first broken one, in model order
    assert finding.value == 3.0
    assert outcome.metrics["nonfinite_parameters"] == 3


def test_fp16_parameters_warn_and_fp32_do_not():
    outcome = check_parameters({"w": torch.ones(2, dtype=torch.float16), "b": torch.ones(2)})
    finding = only(outcome, "train.parameter_dtype")
    assert finding.severity == "warn"
    assert finding.cause == "low-precision-loss"
    assert outcome.metrics["parameter_dtypes"] == ["float16", "float32"]
    assert check_parameters({"w": torch.ones(2), "steps": torch.ones(1, dtype=torch.int64)}).findings == []


def test_findings_are_valid():
    outcome = check_parameters({"w": torch.tensor([math.inf], dtype=torch.float16)})
    assert set(checks_of(outcome)) == {"train.parameters_finite", "train.parameter_dtype"}
    assert_valid(outcome.findings + check_loss_curve(_oscillating(40), [9.0], T).findings)
