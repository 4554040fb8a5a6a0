"""Projected headroom: measured growth between two sizes, carried to the full size, held to the dtype."""

from __future__ import annotations

import math

import pytest
import torch

from influence_doctor.checks.headroom import (
    MAX_GROWTH,
    check_projected_headroom,
    crossing,
    growth_exponent,
    project_headroom,
)
from influence_doctor.checks.thresholds import Thresholds

T = Thresholds()
FP16, FP32 = torch.float16, torch.float32


@pytest.mark.parametrize(
    ("small", "large", "expected"),
    [((64, 1000.0), (1024, 16000.0), 1.0), ((64, 1000.0), (1024, 4000.0), 0.5), ((64, 10.0), (1024, 10.0), 0.0)],
)
def test_growth_is_the_measured_exponent(small, large, expected):
    assert growth_exponent(*small, *large) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("small", "large"),
    [((0, 0.0), (1024, 5.0)), ((64, 0.0), (1024, 5.0)), ((1024, 1.0), (1024, 5.0)), ((64, math.inf), (1024, 5.0))],
)
def test_growth_that_cannot_be_measured_is_taken_as_linear(small, large):
    """A sum grows at most linearly: with one usable size the projection must not be optimistic."""
    assert growth_exponent(*small, *large) == MAX_GROWTH


def test_growth_above_linear_is_noise_and_clipped():
    assert growth_exponent(64, 1.0, 1024, 1e6) == MAX_GROWTH


def test_a_projected_overflow_not_measured_is_a_warning_with_where_it_crosses():
    """A projection is a hypothesis: past the max, but not measured, it is a warn saying where."""
    headroom = project_headroom("fc1/activation_covariance", "covariance", FP16, (64, 1000.0), (1024, 16000.0), 8192)
    assert headroom.max_projected == pytest.approx(16000.0 * 8)
    outcome = check_projected_headroom(headroom, T, None, "over its budget", 8192)
    (finding,) = outcome.findings
    assert (finding.check, finding.stage, finding.severity, finding.cause) == (
        "covariance.projected_headroom",
        "covariance",
        "warn",
        "fp16-overflow",
    )
    assert finding.value == pytest.approx(128000.0) and finding.limit == 65504.0
    # linear growth: 16000 at 1024 reaches 65504 at 1024 × 65504 / 16000 ≈ 4192 examples
    assert "at about 4,192 examples" in finding.message and "Not measured: over its budget" in finding.message
    assert outcome.metrics["projected_headroom"]["growth"] == pytest.approx(1.0)


def test_slower_growth_gives_an_interval_from_linear_to_as_measured():
    headroom = project_headroom("fc1/activation_covariance", "covariance", FP16, (64, 4000.0), (1024, 16000.0), 65536)
    assert 0.0 < headroom.growth < 1.0 and headroom.max_projected > 65504.0
    earliest, latest = crossing(headroom)
    assert earliest == pytest.approx(1024 * 65504.0 / 16000.0)
    assert latest == pytest.approx(1024 * (65504.0 / 16000.0) ** (1.0 / headroom.growth))
    (finding,) = check_projected_headroom(headroom, T, None, "", 65536).findings
    assert f"between {earliest:,.0f} and {latest:,.0f} examples" in finding.message


def test_a_measured_overflow_fails_on_the_count_and_a_measured_finite_sum_is_info():
    headroom = project_headroom("fc1/activation_covariance", "covariance", FP16, (64, 1000.0), (1024, 16000.0), 8192)
    (overflow,) = check_projected_headroom(headroom, T, (8, 81, 8192, 8192), "", 8192).findings
    assert (overflow.severity, overflow.cause, overflow.value, overflow.limit) == ("fail", "fp16-overflow", 8.0, 0.0)
    assert overflow.check == "covariance.full_size_overflow"  # a measurement carries a measurement's name
    assert "accumulated in float16 over the training data in order, 8 of 81 entries are inf/NaN over all 8192" in (
        overflow.message
    )
    (early,) = check_projected_headroom(headroom, T, (8, 81, 3072, 8192), "", 8192).findings
    assert early.severity == "fail" and "after 3072 of the 8192 examples (the pass stopped there)" in early.message
    (finite,) = check_projected_headroom(headroom, T, (0, 81, 8192, 8192), "", 8192).findings
    assert (finite.severity, finite.cause) == ("info", None) and "overestimated" in finite.message
    assert finite.check == "covariance.full_size_overflow"


def test_thin_projected_headroom_is_a_warning_and_a_wide_one_nothing():
    thin = project_headroom("m/lambda_matrix", "lambda", FP16, (64, 100.0), (1024, 1600.0), 8192)  # 12800: 20 %
    (finding,) = check_projected_headroom(thin, T).findings
    assert finding.severity == "warn" and finding.cause is None
    assert finding.limit == pytest.approx(T.covariance.headroom_warn_fraction * 65504.0)
    wide = project_headroom("m/lambda_matrix", "lambda", FP16, (64, 10.0), (1024, 160.0), 8192)
    assert check_projected_headroom(wide, T).findings == []


def test_float32_sums_have_all_the_room_they_need():
    headroom = project_headroom("m/activation_covariance", "covariance", FP32, (64, 1e6), (1024, 1.6e7), 1e7)
    assert check_projected_headroom(headroom, T).findings == []


def test_score_maxima_grow_with_pairs_and_name_the_score_check():
    headroom = project_headroom("pairwise", "pairwise_scores", FP16, (64 * 8, 3e3), (1024 * 8, 3e4), 8192 * 64)
    assert 0.0 < headroom.growth < 1.0
    (finding,) = check_projected_headroom(headroom, T).findings
    assert finding.check == "scores.projected_headroom" and finding.stage == "pairwise_scores"
    assert finding.severity == "warn"  # a projected score maximum is never measured: never a fail


def test_nothing_is_projected_when_the_rehearsal_is_the_full_run():
    headroom = project_headroom("m/activation_covariance", "covariance", FP16, (64, 1000.0), (1024, 60000.0), 1024)
    assert headroom.max_projected == 60000.0
    assert check_projected_headroom(headroom, T).findings == []
