"""Score checks: finite share, robust outliers, query scale, self-influence sign, module dominance, damping
sensitivity. Non-finite and negative self-influence are measured (`fail`); the rest are heuristics (`warn`)."""

from __future__ import annotations

import math

import pytest
import torch

from influence_doctor.checks.scores import (
    check_module_dominance,
    check_query_scale,
    check_scores,
    check_scores_finite,
    finite_fraction,
)
from influence_doctor.checks.thresholds import Thresholds, eps
from tests.checks.helpers import assert_valid, checks_of, generator, only

T = Thresholds()


def _gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=generator(seed))


def test_healthy_gaussian_scores_have_no_findings():
    outcome = check_scores("pairwise_scores", "pairwise", _gaussian(50, 200), T)
    assert outcome.findings == []
    assert outcome.metrics["finite_fraction"] == 1.0
    assert 2.0 < outcome.metrics["max_robust_z"] < 10.0


def test_nan_scores_report_the_finite_fraction():
    scores = _gaussian(10, 10)
    scores[0, :5] = math.nan
    finding = only(check_scores("pairwise_scores", "pairwise", scores, T), "scores.finite")
    assert finding.severity == "fail"
    assert finding.value == pytest.approx(0.95)
    assert finding.limit == 1.0
    assert finding.cause is None
    assert "5 of 100" in finding.message


def test_inf_scores_under_fp16_settings_are_overflow():
    scores = _gaussian(4, 4)
    scores[1, 2] = math.inf
    outcome = check_scores("pairwise_scores", "pairwise", scores, T, overflow_prone=True)
    assert only(outcome, "scores.finite").cause == "fp16-overflow"
    nan_only = _gaussian(4, 4)
    nan_only[0, 0] = math.nan
    assert (
        only(check_scores("pairwise_scores", "pairwise", nan_only, T, overflow_prone=True), "scores.finite").cause
        is None
    )


def test_finite_fraction_and_scores_finite_helpers():
    assert finite_fraction(torch.ones(0)) == 1.0
    assert finite_fraction(torch.tensor([1.0, math.inf, math.nan, 2.0])) == 0.5
    assert check_scores_finite("self_scores", "self", torch.tensor([1.0, math.nan]), min_fraction=0.4) == []
    assert len(check_scores_finite("self_scores", "self", torch.tensor([1.0, math.nan]), min_fraction=0.6)) == 1


def test_absurd_outlier_is_only_a_warning():
    scores = _gaussian(1000)
    scores[123] = 1e7
    outcome = check_scores("pairwise_scores", "pairwise", scores, T)
    finding = only(outcome, "scores.outliers")
    assert finding.severity == "warn"  # a heuristic: influence is heavy-tailed, nothing wrong is measured
    assert finding.cause == "score-outliers"
    assert finding.value > T.scores.outlier_mad
    assert finding.value == outcome.metrics["max_robust_z"]


def test_outlier_limit_is_held_exactly():
    scores = torch.zeros(101, dtype=torch.float64)
    scores[:50] = -1.0
    scores[51:] = 1.0  # median 0, MAD 1: robust z of an entry x is |x| / 1.4826
    scores[0] = -1.4826 * T.scores.outlier_mad * 0.999
    assert "scores.outliers" not in checks_of(check_scores("pairwise_scores", "pairwise", scores, T))
    scores[0] = -1.4826 * T.scores.outlier_mad * 1.001
    assert only(check_scores("pairwise_scores", "pairwise", scores, T), "scores.outliers").value == pytest.approx(
        T.scores.outlier_mad * 1.001
    )


def test_heavy_tailed_but_healthy_scores_are_not_outliers():
    # A Cauchy sample: heavy tails, yet its extremes stay far within the robust-SD limit at this size.
    u = torch.rand(2000, generator=generator(3), dtype=torch.float64)
    cauchy = torch.tan(math.pi * (u - 0.5)).clamp(-500, 500)
    assert "scores.outliers" not in checks_of(check_scores("pairwise_scores", "pairwise", cauchy, T))


def test_one_query_far_out_of_scale_warns():
    scores = _gaussian(8, 100).abs() + 0.1
    scores[5] *= 1000.0
    outcome = check_query_scale("pairwise_scores", scores, T)
    finding = only(outcome, "scores.query_scale")
    assert finding.severity == "warn"
    assert finding.cause == "score-outliers"
    assert finding.subject == "query 5"
    typical = scores.abs().median(dim=1).values
    assert finding.value == pytest.approx(float(typical.max() / typical.median()))
    assert finding.value == outcome.metrics["query_scale_ratio"]
    assert finding.limit == T.scores.query_scale_ratio


def test_queries_of_ordinary_scale_differences_do_not_warn():
    scales = torch.tensor([1.0, 2.0, 0.5, 4.0, 1.5, 8.0, 1.0, 3.0], dtype=torch.float64).unsqueeze(1)
    outcome = check_query_scale("pairwise_scores", _gaussian(8, 100).double() * scales, T)
    assert outcome.findings == []
    assert 2.0 < outcome.metrics["query_scale_ratio"] < T.scores.query_scale_ratio


def test_query_scale_needs_three_queries_and_a_nonzero_median():
    assert check_query_scale("pairwise_scores", _gaussian(2, 50), T).metrics == {}
    assert check_query_scale("pairwise_scores", _gaussian(50), T).metrics == {}
    assert check_query_scale("pairwise_scores", torch.zeros(4, 10), T).metrics == {}


def test_constant_scores_have_no_robust_z():
    outcome = check_scores("pairwise_scores", "pairwise", torch.ones(100), T)
    assert math.isnan(outcome.metrics["max_robust_z"])
    assert outcome.findings == []


def test_negative_self_influence_below_the_limit_is_not_psd():
    scores = torch.rand(100, generator=generator(1), dtype=torch.float64) + 1.0
    scores[7] = -0.5
    scores[9] = -0.25
    finding = only(check_scores("self_scores", "self", scores, T), "scores.self_nonnegative")
    assert finding.severity == "fail"
    assert finding.cause == "not-psd"
    assert finding.value == -0.5
    top = scores.abs().max().item()
    assert finding.limit == pytest.approx(-T.scores.negative_self_influence_eps * eps(torch.float64) * top)
    assert finding.message.startswith("2 self-influence scores are negative")


def test_rounding_sized_negative_self_influence_is_tolerated():
    scores = torch.linspace(1.0, 2.0, 50, dtype=torch.float32)
    scores[0] = -10 * eps(torch.float32)  # below 64 eps of the largest score
    outcome = check_scores("self_scores", "self", scores, T)
    assert "scores.self_nonnegative" not in checks_of(outcome)
    assert outcome.metrics["min_self_influence"] == pytest.approx(-10 * eps(torch.float32))


def test_negative_pairwise_scores_are_normal():
    outcome = check_scores("pairwise_scores", "pairwise", _gaussian(20, 20) - 5.0, T)
    assert outcome.findings == []
    assert "min_self_influence" not in outcome.metrics


def test_one_module_holding_99_5_percent_dominates():
    per_module = {"fc1": torch.full((4, 4), 99.5 / 16), "fc2": torch.full((4, 4), -0.5 / 16)}
    outcome = check_module_dominance("pairwise_scores", per_module, T)
    finding = only(outcome, "scores.module_dominance")
    assert finding.severity == "warn"
    assert finding.subject == "fc1"
    assert finding.value == pytest.approx(0.995)
    assert outcome.metrics["dominant_module"] == "fc1"


def test_a_last_layer_holding_95_percent_is_ordinary():
    per_module = {"fc1": torch.full((4, 4), 5.0 / 16), "fc2": torch.full((4, 4), 95.0 / 16)}
    outcome = check_module_dominance("pairwise_scores", per_module, T)
    assert outcome.findings == []
    assert outcome.metrics["dominant_share"] == pytest.approx(0.95)


def test_balanced_modules_and_all_modules_key():
    per_module = {"fc1": torch.full((3,), 8.0), "fc2": torch.full((3,), 2.0), "all_modules": torch.full((3,), 1e9)}
    outcome = check_module_dominance("pairwise_scores", per_module, T)
    assert outcome.findings == []
    assert outcome.metrics["dominant_share"] == pytest.approx(0.8)


def test_module_dominance_ignores_nonfinite_mass_and_needs_two_modules():
    per_module = {"fc1": torch.tensor([1.0, math.inf, math.nan]), "fc2": torch.tensor([1.0, 2.0])}
    metrics = check_module_dominance("self_scores", per_module, T).metrics
    assert metrics["dominant_module"] == "fc2"
    assert metrics["dominant_share"] == pytest.approx(3 / 4)  # fc1 counts 1 (inf and NaN count 0), fc2 3
    assert check_module_dominance("self_scores", {"fc1": torch.ones(3)}, T).metrics == {}
    assert check_module_dominance("self_scores", {"a": torch.zeros(2), "b": torch.zeros(2)}, T).findings == []


def test_findings_are_valid():
    scores = torch.rand(50, generator=generator(2), dtype=torch.float64)
    scores[0], scores[1], scores[2] = math.nan, -1.0, 1e9
    outcome = check_scores("self_scores", "self", scores, T)
    assert set(checks_of(outcome)) == {"scores.finite", "scores.outliers", "scores.self_nonnegative"}
    severities = {f.check: f.severity for f in outcome.findings}
    assert severities == {"scores.finite": "fail", "scores.outliers": "warn", "scores.self_nonnegative": "fail"}
    assert_valid(outcome.findings)
    assert all(f.stage == "self_scores" for f in outcome.findings)


def test_a_nonfinite_token_score_is_located_to_its_token():
    import torch

    from influence_doctor.checks.scores import check_scores
    from influence_doctor.checks.thresholds import Thresholds

    per_token = torch.ones(3, 5, 4)
    per_token[1, 2, 3] = float("nan")
    per_token[2, 4, 0] = 100.0
    outcome = check_scores("pairwise_scores", "pairwise", per_token.sum(-1), Thresholds(), per_token=per_token)
    (finding,) = [f for f in outcome.findings if f.check == "scores.finite"]
    expected = "1 of 60 pairwise scores are inf or NaN, the first at query 1, training example 2, token 3"
    assert expected in finding.message
    assert outcome.metrics["per_token"]["largest_at"] == "query 2, training example 4, token 0"
    assert outcome.metrics["per_token"]["largest"] == 100.0
