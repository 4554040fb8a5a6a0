"""The second sampling seed's arithmetic and verdict (`audit/seed.py`, `checks/seed.py`), against exact values
of the law 1 − ρ ∝ n^−α the projection assumes."""

from __future__ import annotations

import math

import pytest

from influence_doctor.audit.seed import SeedAgreement, examples_for, noise_exponent, project
from influence_doctor.checks.seed import check_seed
from influence_doctor.checks.thresholds import Thresholds
from tests.checks.helpers import assert_valid, only


def law(alpha: float, scale: float = 3.2):
    """ρ(n) = 1 − scale·n^−α: the exact curve the trend is fitted to."""
    return lambda n: 1.0 - scale * n ** (-alpha)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0])
def test_the_exponent_of_an_exact_power_law_is_recovered(alpha):
    rho = law(alpha)
    assert noise_exponent([(64, rho(64)), (256, rho(256))]) == pytest.approx(alpha, rel=1e-12)


def test_the_exponent_is_clipped_to_what_a_monte_carlo_estimate_can_do_and_needs_two_points():
    assert noise_exponent([(64, 0.5), (256, 0.4)]) == 0.0  # the noise rose: no fall to project
    assert noise_exponent([(64, 0.5), (256, 0.999)]) == 1.0  # faster than 1/n is not a Monte-Carlo fall
    assert noise_exponent([(64, 0.5)]) is None
    assert noise_exponent([(64, 0.5), (64, 0.6)]) is None
    assert noise_exponent([(64, math.nan), (256, 0.6)]) is None


def test_the_projection_and_the_examples_for_the_bar_follow_the_law_exactly():
    rho = law(0.5)
    assert project(rho(256), 256, 4096, 0.5) == pytest.approx(rho(4096), rel=1e-12)
    assert project(0.7, 256, 256, 0.5) == pytest.approx(0.7)
    assert project(0.7, 256, 4096, 0.0) == pytest.approx(0.7)  # no measured fall: no gain promised
    bar = rho(10_000)
    assert examples_for(bar, rho(256), 256, 0.5) == pytest.approx(10_000, abs=1)
    assert examples_for(0.9, 0.95, 256, 0.5) is None  # already at the bar
    assert examples_for(0.9, 0.6, 256, 0.0) is None  # a trend that does not fall promises nothing
    assert examples_for(0.9, 0.6, 256, None) is None


def measured(**fields) -> SeedAgreement:
    values = dict(
        median_spearman=0.65, worst_spearman=0.48, top_overlap=0.65, examples=256, trend=[(64, 0.5), (256, 0.65)]
    )
    values.update(fields)
    return SeedAgreement(**values)


def test_below_the_bar_is_a_warning_with_its_cause_and_every_option_measured():
    seed = measured(
        options={
            "empirical_fisher": {"against_true_fisher": 0.42},
            "damping_heuristic": {"seed_median_spearman": 0.8, "examples": 64},
            "more_examples": {"examples_for_bar": 108_000},
        }
    )
    outcome = check_seed(seed, "pairwise_scores", Thresholds())
    finding = only(outcome, "scores.sampling_seed")
    assert_valid(outcome.findings)
    assert (finding.severity, finding.cause, finding.value, finding.limit) == (
        "warn",
        "fisher-sampling-noise",
        0.65,
        0.9,
    )
    for text in ("0.650", "worst 0.480", "256 examples", "use_empirical_fisher=True", "0.420", "damping_factor=None"):
        assert text in finding.message, text
    assert "108,000 examples" in finding.message
    assert outcome.metrics["median_spearman"] == 0.65


def test_at_the_bar_it_is_information_and_a_probe_only_measurement_says_it_is_a_lower_bound():
    finding = only(
        check_seed(measured(median_spearman=0.97, lower_bound=True), "self_scores", Thresholds()),
        "scores.sampling_seed",
    )
    assert (finding.severity, finding.cause, finding.stage) == ("info", None, "self_scores")
    assert "at least as well" in finding.message


def test_the_projection_to_the_full_run_is_what_is_judged():
    # measured below the bar at the rehearsal, projected above it at the full run: information, said as a projection
    seed = measured(median_spearman=0.85, projected_examples=100_000, projected_median=0.95)
    finding = only(check_seed(seed, "pairwise_scores", Thresholds()), "scores.sampling_seed")
    assert finding.severity == "info" and finding.value == 0.95
    assert "projected to 0.950 at the full run's 100,000 examples" in finding.message
    # and the other way round
    seed = measured(median_spearman=0.93, projected_examples=100_000, projected_median=0.5)
    assert only(check_seed(seed, "pairwise_scores", Thresholds()), "scores.sampling_seed").severity == "warn"


def test_the_bar_is_a_threshold_and_nothing_is_said_without_a_measurement():
    thresholds = Thresholds.from_mapping({"seed_min_spearman": 0.6})
    assert only(check_seed(measured(), "pairwise_scores", thresholds), "scores.sampling_seed").severity == "info"
    assert check_seed(None, "pairwise_scores", Thresholds()).findings == []
    assert check_seed(SeedAgreement(skipped="the empirical Fisher"), "pairwise_scores", Thresholds()).findings == []
    assert check_seed(SeedAgreement(), "pairwise_scores", Thresholds()).findings == []  # NaN: nothing measured
