"""`scores.damping_sensitivity`: how much the rankings move under every module's damping ×10 — reported
as `info`, never judged (damping is the user's modeling choice)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from influence_doctor.checks.damping import check_damping_sensitivity
from influence_doctor.checks.thresholds import Thresholds
from tests.checks.helpers import assert_valid

T = Thresholds()


@pytest.mark.parametrize(("spearman", "moved"), [(0.2, True), (0.899, True), (0.9, False), (0.999, False)])
def test_the_rankings_movement_is_info_with_the_measured_agreement(spearman, moved):
    agreement = {"median_spearman": spearman, "worst_spearman": spearman - 0.1, "rows": 8.0}
    outcome = check_damping_sensitivity("pairwise_scores", agreement, T)
    (finding,) = outcome.findings
    assert (finding.check, finding.severity, finding.cause) == ("scores.damping_sensitivity", "info", None)
    assert finding.value == spearman and finding.limit == T.scores.damping_sensitivity_min_spearman
    assert ("your modeling choice" in finding.message) is moved
    assert f"worst query {spearman - 0.1:.3f}" in finding.message  # per-query rankings say their worst
    assert outcome.metrics["damping_x10"] == agreement


def test_self_scores_have_one_ranking_and_no_worst_query():
    outcome = check_damping_sensitivity("self_scores", {"median_spearman": 0.95, "rows": 1.0}, T)
    assert "worst query" not in outcome.findings[0].message


def test_an_undefined_agreement_says_nothing():
    assert check_damping_sensitivity("pairwise_scores", {"median_spearman": math.nan}, T).findings == []
    assert check_damping_sensitivity("pairwise_scores", {}, T).findings == []


@settings(max_examples=50, deadline=None)
@given(
    median=st.floats(allow_nan=True, allow_infinity=True),
    worst=st.floats(allow_nan=True, allow_infinity=True),
    rows=st.floats(allow_nan=True, allow_infinity=True),
)
def test_never_raises_and_never_warns_or_fails(median, worst, rows):
    outcome = check_damping_sensitivity(
        "pairwise_scores", {"median_spearman": median, "worst_spearman": worst, "rows": rows}, T
    )
    assert_valid(outcome.findings)
    assert all(f.severity == "info" for f in outcome.findings)
