"""Training-curve and parameter checks on constructed and really trained loss curves."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.checks.train import (
    SampleLoss,
    check_loss_curve,
    check_parameters,
    check_trained_loss,
    detrend,
    periodicity,
    step_noise,
    window_means,
)
from tests.checks.helpers import assert_valid, checks_of, only

T = Thresholds()


def _decaying(n: int = 200) -> list[float]:
    return [0.1 + 2.0 * math.exp(-t / 30) for t in range(n)]


def _oscillating(n: int, period: int = 4, amplitude: float = 0.8) -> list[float]:
    return [1.0 + amplitude * math.sin(2 * math.pi * t / period) for t in range(n)]


def _climb() -> list[float]:
    """Down from 1.0 to 0.1 in 100 steps, then back up to 0.6."""
    return [1.0 - 0.009 * t for t in range(100)] + [0.1 + 0.005 * t for t in range(1, 101)]


def _converging_full_batch_adam() -> list[float]:
    """Real full-batch Adam on a two-layer tanh MLP: 0.75 → 0.075 in 40 steps, with bumps of up to ~10%
    per step (0.167 → 0.204 over four steps) in the second half."""
    generator = torch.Generator().manual_seed(21)
    x = torch.randn(256, 8, generator=generator)
    w = torch.randn(8, generator=generator) / math.sqrt(8)
    y = (1.2 * torch.sin(2 * x @ w) + 0.25 * torch.randn(256, generator=generator)).unsqueeze(1)
    torch.manual_seed(21)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    losses = []
    for _ in range(40):
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# --- helpers ------------------------------------------------------------------------------------------


def test_detrend_removes_a_line_exactly():
    assert detrend([1.0, 3.0, 5.0, 7.0]) == pytest.approx([0.0, 0.0, 0.0, 0.0])
    assert detrend([0.0, 1.0, 0.0, 1.0]) == pytest.approx([-0.2, 0.6, -0.6, 0.2])  # slope 0.2 through 0.5
    assert detrend([2.0]) == [0.0]


def autocorrelation(residuals: list[float], lag: int) -> float:
    """The exact reference, one lag at a time: mean lagged product over mean square, clipped to [-1, 1]."""
    n = len(residuals)
    if not 0 < lag < n:
        return 0.0
    energy = sum(r * r for r in residuals) / n
    if energy == 0.0 or not math.isfinite(energy):
        return 0.0
    product = sum(residuals[i] * residuals[i + lag] for i in range(n - lag)) / (n - lag)
    return max(-1.0, min(1.0, product / energy))


def test_periodicity_reads_the_same_correlations_as_autocorrelation():
    """periodicity computes every lag at once; each must be exactly what autocorrelation gives."""
    from influence_doctor.checks.train import _autocorrelations

    rng = random.Random(3)
    for n in (2, 5, 40, 301):
        residuals = [rng.gauss(0.0, 1.0) + math.sin(i / 3.0) for i in range(n)]
        at_once = _autocorrelations(residuals, n + 3)
        for lag in range(n + 4):
            assert at_once[lag] == pytest.approx(autocorrelation(residuals, lag), abs=1e-12), (n, lag)
    assert _autocorrelations([0.0] * 10, 4) == [0.0] * 5  # no energy: no correlation


def test_autocorrelation_is_normalised_per_pair():
    from influence_doctor.checks.train import _autocorrelations

    alternating = [1.0, -1.0, 1.0, -1.0]
    assert _autocorrelations(alternating, 2)[1:] == pytest.approx([-1.0, 1.0])  # the code, on the same series
    assert autocorrelation(alternating, 1) == pytest.approx(-1.0)  # mean of three products −1 over mean square 1
    assert autocorrelation(alternating, 2) == pytest.approx(1.0)
    assert autocorrelation([1.0, 0.0, -1.0], 1) == pytest.approx(0.0)  # (0 + 0)/2 over 2/3
    assert autocorrelation([1.0, 2.0, -3.0], 1) == pytest.approx(((2.0 - 6.0) / 2) / (14.0 / 3))
    assert autocorrelation(alternating, 0) == 0.0
    assert autocorrelation(alternating, 4) == 0.0
    assert autocorrelation([0.0, 0.0, 0.0], 1) == 0.0


def test_periodicity_finds_the_half_period_of_a_regular_swing():
    strength, half_period = periodicity(_oscillating(40, period=8), min_cycles=2.5)
    assert half_period == 4
    assert strength > 0.95
    assert periodicity([1.0, 9.0] * 10, min_cycles=2.5) == (pytest.approx(1.0, abs=0.01), 1)
    assert periodicity([float(t) for t in range(30)], min_cycles=2.5) == (0.0, 0)  # a line is all trend
    assert periodicity(_oscillating(16, period=8), min_cycles=2.5) == (0.0, 0)  # two periods: too few to judge


def test_periodicity_of_white_noise_is_weak():
    rng = random.Random(0)
    strengths = [periodicity([rng.gauss(0, 1) for _ in range(50)], min_cycles=2.5)[0] for _ in range(50)]
    assert max(strengths) < 0.6


def test_step_noise_and_window_means_exact():
    assert step_noise([0.0, 2.0, 0.0]) == pytest.approx(math.sqrt((4 + 4) / (2 * 2)))
    assert step_noise([float(t) for t in range(10)]) == pytest.approx(math.sqrt(0.5))  # a unit trend per step
    assert step_noise([3.0]) == 0.0
    assert window_means([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.5, 3.5, 4.5]  # the last window ends at the end
    assert window_means([1.0, 2.0, 3.0, 4.0], 2) == [1.5, 3.5]
    assert window_means([1.0, 2.0], 2) == [1.5]


# --- the loss curve -----------------------------------------------------------------------------------


def test_smooth_decreasing_curve_has_no_findings():
    loss = _decaying()
    outcome = check_loss_curve(loss, [], T)
    assert outcome.findings == []
    assert outcome.metrics["steps"] == 200
    assert outcome.metrics["window_steps"] == 20
    assert outcome.metrics["initial_loss"] == pytest.approx(sum(loss[:20]) / 20)
    assert outcome.metrics["final_loss"] == pytest.approx(sum(loss[-20:]) / 20)
    assert outcome.metrics["oscillation_significance"] < T.training.oscillation_significance


def test_short_runs_average_at_least_the_minimum_window():
    outcome = check_loss_curve(_decaying(30), [], T)
    assert outcome.metrics["window_steps"] == 5  # 10% of 30 steps is 3, fewer than the 5-step minimum
    assert outcome.metrics["initial_loss"] == pytest.approx(sum(_decaying(5)) / 5)


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


def test_decrease_then_climb_far_above_the_lowest_level_diverges():
    loss = _climb()
    outcome = check_loss_curve(loss, [], T)
    finding = only(outcome, "train.divergence")
    assert finding.severity == "fail"
    assert finding.cause == "training-diverged"
    logs = [math.log(v) for v in loss]
    levels = window_means(logs, 20)
    assert finding.value == pytest.approx(math.exp(levels[-1] - min(levels)))  # geometric window means
    assert finding.value > T.training.divergence_ratio
    assert outcome.metrics["lowest_loss"] == pytest.approx(math.exp(min(levels)))
    assert outcome.metrics["divergence_significance"] > T.training.divergence_significance


def test_a_noisy_climb_still_diverges():
    rng = random.Random(1)
    loss = [value * (1 + 0.3 * rng.gauss(0, 1)) for value in _climb()]
    assert only(check_loss_curve(loss, [], T), "train.divergence").severity == "fail"


def test_a_mild_rebound_is_not_divergence():
    loss = [1.0 - 0.009 * t for t in range(100)] + [0.1 + 0.001 * t for t in range(1, 101)]  # ends at 2× min
    assert "train.divergence" not in checks_of(check_loss_curve(loss, [], T))


@pytest.mark.parametrize("seed", range(20))
def test_single_example_noise_is_not_divergence(seed):
    """Per-example squared errors (χ² with one degree of freedom) around a converged level: window means
    scatter by several times, which a plain ratio would call divergence."""
    rng = random.Random(seed)
    loss = [(0.05 + math.exp(-t / 5)) * rng.gauss(0, 1) ** 2 for t in range(rng.choice((20, 40, 80)))]
    outcome = check_loss_curve(loss, [], T)
    assert "train.divergence" not in checks_of(outcome)
    assert not any(finding.severity == "fail" for finding in outcome.findings)


def test_a_loss_that_rose_steadily_fails_as_diverged():
    """Noiseless and rising from start to end: no healthy run does that (SPEC 4.1, a steady rise)."""
    finding = only(check_loss_curve([1.0 + 0.001 * t for t in range(50)], [], T), "train.loss_decreased")
    assert (finding.severity, finding.cause) == ("fail", "training-diverged")
    assert finding.value > finding.limit


def test_a_rise_between_the_warn_and_the_fail_limit_warns():
    """Above the start by more than the healthy 99.5th percentile, within the healthy maximum × 1.5."""
    rng = random.Random(3)
    for _ in range(200):
        loss = [1.0 + 0.002 * t + 0.05 * rng.gauss(0, 1) for t in range(60)]
        outcome = check_loss_curve(loss, [], T)
        rise = outcome.metrics["loss_rise_significance"]
        if T.training.loss_rise_significance <= rise < T.training.loss_rise_fail_significance:
            assert only(outcome, "train.loss_decreased").severity == "warn"
            return
    pytest.fail("no curve fell between the two limits")


def test_a_loss_that_explodes_and_plateaus_far_above_its_start_diverged():
    """The shape of Adam at lr 50: 0.6, then 10⁹, settling near 10⁶. Its lowest window is the plateau
    itself, so only the first recorded loss shows how far it went."""
    rng = random.Random(5)
    loss = [0.6, 1e9, 4e9, 1.4e9] + [1e6 * math.exp(0.3 * rng.gauss(0, 1)) for _ in range(96)]
    outcome = check_loss_curve(loss, [], T)
    (finding,) = [f for f in outcome.findings if f.check == "train.divergence"]
    assert (finding.severity, finding.cause) == ("fail", "training-diverged")
    assert outcome.metrics["start_ratio"] > 1e5 and outcome.metrics["divergence_ratio"] < T.training.divergence_ratio
    assert "first recorded value" in finding.message


def test_a_single_lucky_first_example_is_not_a_blow_up():
    """Batch 1: the first example's loss is 0.002, the run's typical loss ~1, noisy, and descending."""
    rng = random.Random(8)
    loss = [0.002] + [max(1e-4, (1.0 - t / 200) * math.exp(1.5 * rng.gauss(0, 1))) for t in range(1, 100)]
    outcome = check_loss_curve(loss, [], T)
    assert outcome.metrics["start_ratio"] > T.training.start_rise_ratio  # far above the first loss...
    assert not [f for f in outcome.findings if f.severity == "fail"]  # ...but within the noise of a single example


def test_the_measured_sample_loss_decides_whether_training_ended_above_its_start():
    """The lucky first example read alone would be a 200-fold rise; the doctor's own measurement on a
    fixed sample says the model improved, and the curve's first step is then not judged."""
    rng = random.Random(3)
    loss = [0.006] + [math.exp(1.5 * rng.gauss(0, 1)) for _ in range(99)]
    any_rise = Thresholds.from_mapping({"start_rise_significance": 0.0})
    unmeasured = check_loss_curve(loss, [], any_rise)
    assert [f.check for f in unmeasured.findings if f.severity == "fail"] == ["train.divergence"]
    measured = check_loss_curve(loss, [], any_rise, SampleLoss(2.0, 1.6, 256))
    assert [f for f in measured.findings if f.severity == "fail"] == []
    assert measured.metrics["trained_loss_ratio"] == pytest.approx(0.8)
    assert measured.metrics["start_ratio"] > 100  # still measured, for the calibration


def test_a_trained_loss_far_above_the_untrained_one_is_a_blow_up():
    finding = only(check_trained_loss(SampleLoss(0.5, 0.5 * 1e6, 256), T), "train.trained_loss")
    assert (finding.severity, finding.cause, finding.stage) == ("fail", "training-diverged", "train")
    assert finding.value == pytest.approx(1e6)
    assert "256 of its training examples" in finding.message


@pytest.mark.parametrize("trained", [math.nan, math.inf])
def test_a_nonfinite_trained_loss_is_a_blow_up(trained):
    assert only(check_trained_loss(SampleLoss(0.5, trained, 64), T), "train.trained_loss").severity == "fail"


def test_a_moderate_rise_fails_only_when_the_curve_climbed_too():
    """Between the warn and the fail limit the rise alone warns; with the logged loss climbing as well it
    is a fail."""
    ratio = (T.training.trained_loss_warn_ratio + T.training.trained_loss_fail_ratio) / 2
    alone = only(check_trained_loss(SampleLoss(1.0, ratio, 256), T), "train.trained_loss")
    assert (alone.severity, alone.cause) == ("warn", None)
    curve = {"loss_rise_significance": T.training.loss_rise_significance}
    climbed = only(check_trained_loss(SampleLoss(1.0, ratio, 256), T, curve), "train.trained_loss")
    assert (climbed.severity, climbed.cause) == ("fail", "training-diverged")
    assert "logged loss climbed" in climbed.message


def test_a_fine_tuned_model_is_judged_against_a_fresh_models_loss():
    """A converged model restarted with a fresh optimizer: 4e-5 → 7e-3 is 180× its start and nothing
    beside the loss of a freshly initialised copy (0.9), so it warns and fails nothing."""
    sample = SampleLoss(4e-5, 7e-3, 256, reference=0.9)
    assert sample.scale == 0.9
    outcome = check_trained_loss(sample, T, {"loss_rise_significance": 10.0, "peak_loss": 0.03, "final_loss": 0.007})
    assert [(f.check, f.severity) for f in outcome.findings] == [("train.trained_loss", "warn")]
    assert outcome.metrics["reference_loss_ratio"] == pytest.approx(7e-3 / 0.9)
    worse = only(check_trained_loss(SampleLoss(4e-5, 2.0, 256, reference=0.9), T), "train.trained_loss")
    assert worse.severity == "fail" and "freshly initialised copy" in worse.message


def test_without_a_fresh_copy_the_start_alone_is_held_to_a_wider_limit():
    """A model beyond the evidence budget: its start may be a converged checkpoint, so 2× its start only
    warns; the same rise measured against a fresh copy's loss is worse than knowing nothing."""
    assert T.training.trained_loss_fail_ratio < 2.0 < T.training.trained_loss_unreferenced_fail_ratio
    alone = only(check_trained_loss(SampleLoss(1.0, 2.0, 256), T), "train.trained_loss")
    assert alone.severity == "warn"
    referenced = only(check_trained_loss(SampleLoss(1.0, 2.0, 256, reference=1.0), T), "train.trained_loss")
    assert (referenced.severity, referenced.limit) == ("fail", T.training.trained_loss_fail_ratio)
    far = only(check_trained_loss(SampleLoss(1.0, 5.0, 256), T), "train.trained_loss")
    assert (far.severity, far.limit) == ("fail", T.training.trained_loss_unreferenced_fail_ratio)


def test_a_fresh_copy_never_lowers_the_scale_below_the_start():
    assert SampleLoss(1.0, 1.2, 256, reference=0.7).scale == 1.0
    assert SampleLoss(1.0, 1.2, 256, reference=math.nan).scale == 1.0


@pytest.mark.parametrize(("cosine", "severity"), [(0.9, "fail"), (0.05, None), (-0.8, None)])
def test_a_rise_along_the_starting_gradient_is_a_sign_error(cosine, severity):
    outcome = check_trained_loss(SampleLoss(1.0, 1.05, 256, reference=1.0, uphill_cosine=cosine), T)
    found = [f for f in outcome.findings if f.check == "train.uphill"]
    assert [f.severity for f in found] == ([severity] if severity else [])
    if severity:
        assert found[0].cause == "training-diverged" and "+0.90" in found[0].message


def test_uphill_needs_the_loss_to_have_risen():
    outcome = check_trained_loss(SampleLoss(1.0, 0.9, 256, uphill_cosine=0.9), T)
    assert outcome.findings == []


def test_a_blow_up_that_settles_back_at_its_start_is_an_explosion():
    """The measured loss ended where it started (ratio 1.02), and the logged loss peaked 10⁵× above its
    end on the way: in untrained units, 10⁵ × 1.02."""
    curve = {"peak_loss": 1e5, "final_loss": 1.0}
    finding = only(check_trained_loss(SampleLoss(1.0, 1.02, 256), T, curve), "train.explosion")
    assert (finding.severity, finding.cause) == ("fail", "training-diverged")
    assert finding.value == pytest.approx(1.02e5)
    recovered = check_trained_loss(SampleLoss(1.0, 0.5, 256), T, curve)
    assert recovered.findings == []  # it blew up and then learned: no wrong number left
    assert recovered.metrics["explosion_height"] == pytest.approx(0.5e5)


def test_a_steady_ascent_measured_and_logged_is_diverged():
    loss = [1.0 + 0.01 * t for t in range(60)]
    outcome = check_loss_curve(loss, [], T, SampleLoss(1.0, 1.3, 256))
    assert ("train.trained_loss", "fail") in [(f.check, f.severity) for f in outcome.findings]


def test_a_climb_near_zero_loss_is_not_divergence():
    """The curve climbs 5× above its lowest level (a fail on the curve alone), but the climb is a
    hundredth of a percent of an untrained model's loss: a warn."""
    loss = [1e-3] * 30 + [1e-4] * 30 + [5e-4] * 30
    alone = check_loss_curve(loss, [], T)
    assert only(alone, "train.divergence").severity == "fail"
    near_zero = check_loss_curve(loss, [], T, SampleLoss(1e-3, 5e-4, 256, reference=2.0))
    finding = only(near_zero, "train.divergence")
    assert (finding.severity, finding.cause) == ("warn", None)
    assert near_zero.metrics["climb_share"] < T.training.divergence_min_share
    assert "too small to call divergence" in finding.message
    material = check_loss_curve([1.0] * 30 + [0.01] * 30 + [0.5] * 30, [], T, SampleLoss(1.0, 0.5, 256, reference=1.0))
    assert only(material, "train.divergence").severity == "fail"


@pytest.mark.parametrize(("untrained", "trained"), [(1.0, 0.3), (1.0, 1.0 * 0.999), (math.nan, 5.0), (0.0, 5.0)])
def test_a_trained_loss_at_or_below_the_untrained_one_is_fine(untrained, trained):
    outcome = check_trained_loss(SampleLoss(untrained, trained, 256), T)
    assert outcome.findings == []
    assert ("trained_loss_ratio" in outcome.metrics) == (math.isfinite(untrained) and untrained > 0)


def test_a_flat_noiseless_loss_did_not_decrease():
    outcome = check_loss_curve([0.7] * 40, [], T)
    assert only(outcome, "train.loss_decreased").severity == "warn"
    assert outcome.metrics["step_noise"] == 0.0


def test_a_slight_rise_within_the_noise_is_not_judged():
    rng = random.Random(6)
    loss = [1.0 + 0.001 * t + 0.2 * rng.gauss(0, 1) for t in range(60)]
    outcome = check_loss_curve(loss, [], T)
    assert outcome.metrics["final_loss"] > outcome.metrics["initial_loss"]  # higher at the end, but only by noise
    assert outcome.metrics["loss_rise_significance"] < T.training.loss_rise_significance
    assert "train.loss_decreased" not in checks_of(outcome)


def test_a_swing_over_ten_steps_cannot_be_told_from_noise():
    """Ten second-half steps: eight noisy steps alone reach a periodicity of 0.8, so even a clean swing
    stays below the derived significance (periodicity × √steps)."""
    outcome = check_loss_curve(_oscillating(20), [], T)
    strength = outcome.metrics["oscillation_periodicity"]
    assert strength > 0.95
    assert outcome.metrics["oscillation_significance"] == pytest.approx(strength * math.sqrt(10))
    assert "train.oscillation" not in checks_of(outcome)


@pytest.mark.parametrize("steps", [40, 60])
def test_large_oscillation_is_flagged_on_short_runs(steps):
    outcome = check_loss_curve(_oscillating(steps), [], T)
    finding = only(outcome, "train.oscillation")
    assert finding.severity == "fail"
    assert finding.cause == "training-oscillating"
    assert finding.value >= T.training.oscillation_significance
    assert outcome.metrics["oscillation_period"] == 4
    assert outcome.metrics["oscillation_amplitude"] > T.training.oscillation_min_amplitude
    assert outcome.metrics["second_half_progress"] < T.training.oscillation_max_progress


def test_large_oscillation_is_flagged_on_long_runs():
    assert only(check_loss_curve(_oscillating(200), [], T), "train.oscillation").cause == "training-oscillating"


def test_a_loss_alternating_between_two_levels_oscillates():
    """What a per-step cyclic learning rate does: L, L/16, L, L/16, ... with no net progress."""
    finding = only(check_loss_curve([16.4, 1.03] * 30, [], T), "train.oscillation")
    assert finding.severity == "fail"
    assert "every ~2 steps" in finding.message


def test_a_regular_swing_on_a_converging_loss_is_only_a_warning():
    loss = [(0.1 + math.exp(-t / 30)) * (1 + 0.5 * (-1) ** t) for t in range(100)]
    outcome = check_loss_curve(loss, [], T)
    finding = only(outcome, "train.oscillation")
    assert finding.severity == "warn"
    assert outcome.metrics["second_half_progress"] > T.training.oscillation_max_progress


def test_converging_full_batch_adam_with_late_bumps_is_healthy():
    loss = _converging_full_batch_adam()
    assert loss[0] == pytest.approx(0.75, abs=0.01)
    assert loss[-1] < 0.1
    assert max(b / a for a, b in itertools.pairwise(loss[20:])) > 1.05  # real bumps in the second half
    outcome = check_loss_curve(loss, [], T)
    assert outcome.findings == []
    assert outcome.metrics["oscillation_significance"] < T.training.oscillation_significance


def test_small_noise_at_convergence_is_not_oscillation():
    rng = random.Random(0)
    converged = [0.1 + 2.0 * math.exp(-t / 10) for t in range(100)]  # within 1e-4 of 0.1 by step 100
    loss = converged + [0.1 * (1 + 0.01 * rng.uniform(-1, 1)) for _ in range(100)]
    outcome = check_loss_curve(loss, [], T)
    assert "train.oscillation" not in checks_of(outcome)
    assert outcome.metrics["oscillation_amplitude"] < T.training.oscillation_min_amplitude


@pytest.mark.parametrize("seed", range(10))
def test_noisy_but_converging_training_is_not_oscillation(seed):
    rng = random.Random(seed)
    loss = [(0.1 + 2.0 * math.exp(-t / 20)) * (1 + 0.25 * rng.gauss(0, 1)) for t in range(200)]
    assert min(loss) > 0
    assert "train.oscillation" not in checks_of(check_loss_curve(loss, [], T))


@pytest.mark.parametrize("seed", range(20))
def test_short_noisy_flat_curves_are_not_oscillation(seed):
    rng = random.Random(seed)
    loss = [1.0 + 0.5 * rng.gauss(0, 1) for _ in range(rng.choice((16, 20, 24)))]
    assert "train.oscillation" not in checks_of(check_loss_curve(loss, [], T))


def test_validation_gap_warns():
    loss = _decaying()
    outcome = check_loss_curve(loss, [None, 1.2, None, 3.0, None], T)
    finding = only(outcome, "train.validation_gap")
    assert finding.severity == "warn"
    assert finding.subject == "validation_loss"
    start, end = outcome.metrics["initial_loss"], outcome.metrics["final_loss"]
    assert start > 1.2  # the scale is the larger of the first training window and the first validation loss
    error = outcome.metrics["step_noise"] / math.sqrt(outcome.metrics["window_steps"])
    assert finding.value == pytest.approx((3.0 - end - 2 * error) / start)
    assert finding.value > T.training.max_generalization_gap
    healthy = check_loss_curve(loss, [0.15], T)
    assert healthy.metrics["generalization_gap"] == pytest.approx((0.15 - end - 2 * error) / start)
    assert healthy.findings == []


def test_validation_gap_of_a_run_that_starts_converged_is_in_units_of_its_validation_loss():
    """Fine-tuning a converged model: its first training loss is already tiny, so the gap is measured
    against the first validation loss, not in thousands of a near-zero start."""
    loss = [0.01 * (1 + 0.1 * math.sin(t)) for t in range(100)]
    outcome = check_loss_curve(loss, [0.4, None, 0.45], T)
    assert outcome.metrics["generalization_gap"] == pytest.approx((0.45 - 0.01) / 0.4, rel=0.05)
    assert "train.validation_gap" not in checks_of(outcome)


def test_validation_gap_stays_sane_when_the_training_loss_nears_zero():
    loss = [2.0 * math.exp(-t / 10) for t in range(100)]  # ends near 1e-4
    outcome = check_loss_curve(loss, [0.5], T)
    assert outcome.metrics["generalization_gap"] < 1.0  # a ratio to the final loss would be in the thousands
    assert "train.validation_gap" not in checks_of(outcome)


def test_validation_of_only_none_or_nonfinite_is_ignored():
    outcome = check_loss_curve(_decaying(), [None, math.nan, math.inf], T)
    assert "generalization_gap" not in outcome.metrics


def test_empty_loss_curve():
    assert check_loss_curve([], [], T).metrics == {"steps": 0}


def test_tiny_and_odd_curves_do_not_raise():
    for loss in ([1.0], [0.0, 0.0], [-1.0, 2.0, -3.0] * 5, [1e308, 1e308, -1e308] * 6, [5e-324] * 20):
        assert_valid(check_loss_curve(loss, [1.0], T).findings)


# --- parameters ---------------------------------------------------------------------------------------


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


def test_a_blow_up_gets_one_divergence_finding_and_a_negative_loss_no_ratio():
    rng = random.Random(9)
    exploded = [0.5] + [1e6 * (1 + 0.5 * t / 100) * math.exp(0.2 * rng.gauss(0, 1)) for t in range(99)]
    outcome = check_loss_curve(exploded, [], T)
    assert [f.check for f in outcome.findings].count("train.divergence") == 1
    log_density = [-1.0 - 0.01 * t + 0.05 * rng.gauss(0, 1) for t in range(80)]  # a loss below zero, descending
    outcome = check_loss_curve(log_density, [], T)
    assert "start_ratio" not in outcome.metrics
    assert not [f for f in outcome.findings if f.severity == "fail"]


def _restart(rise: float, standard_error: float, directional_t: float, cosine: float = 0.54) -> SampleLoss:
    """A converged restart as measured: the loss at 22.9 before and after, the cosine from the issue."""
    return SampleLoss(
        22.9,
        22.9 + rise,
        256,
        reference=40.0,
        uphill_cosine=cosine,
        rise_standard_error=standard_error,
        gradient_snr=1e-13,
        gradient_dimensions=5.0,
        groups=16,
        directional_t=directional_t,
    )


def test_a_rise_within_its_noise_is_no_sign_error_whatever_the_cosine():
    # 22.9 → 22.9000069 (ratio 1.0000003) with a standard error of 1e-5: rounding, not a rise
    outcome = check_trained_loss(_restart(6.9e-6, 1e-5, directional_t=8.0), T)
    assert [f for f in outcome.findings if f.severity == "fail"] == []
    assert outcome.metrics["rise_standard_error"] == 1e-5


def test_a_gradient_that_is_noise_along_the_step_makes_the_cosine_no_evidence():
    # a rise well beyond its noise, but the start's gradient points nowhere along the step (a minimum)
    outcome = check_trained_loss(_restart(1e-3, 1e-5, directional_t=0.3), T)
    assert not [f for f in outcome.findings if f.check == "train.uphill"]


def test_a_significant_rise_along_a_significant_gradient_is_the_sign_error():
    (uphill,) = [
        f for f in check_trained_loss(_restart(1e-3, 1e-5, directional_t=8.0), T).findings if f.check == "train.uphill"
    ]
    assert (uphill.severity, uphill.cause) == ("fail", "training-diverged")
    # the bars are thresholds: a looser significance lets the small rise through too
    loose = Thresholds.from_mapping({"sample_rise_significance": 0.5})
    assert [
        f.check for f in check_trained_loss(_restart(6.9e-6, 1e-5, 8.0), loose).findings if f.severity == "fail"
    ] == ["train.uphill"]
