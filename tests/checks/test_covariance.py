"""Covariance-sum checks: finiteness and its cause, headroom, symmetry, diagonal, dead units, counts."""

from __future__ import annotations

import math

import pytest
import torch

from influence_doctor.checks.covariance import check_covariance_sum, check_examples_processed, overflow_prone
from influence_doctor.checks.thresholds import Thresholds, eps
from tests.checks.helpers import antisymmetric, assert_valid, checks_of, only, spd

T = Thresholds()
SUBJECT = "fc1/activation_covariance"


def test_healthy_covariance_has_no_findings_in_every_dtype():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        outcome = check_covariance_sum(spd(8).to(dtype) * 100, 100, SUBJECT, T)
        assert outcome.findings == [], (dtype, checks_of(outcome))
        assert outcome.metrics["dead_units"] == 0
        assert outcome.metrics["nonfinite"] == 0
        assert outcome.metrics["size"] == 8


def test_inf_in_fp16_sum_is_fp16_overflow_and_names_the_position():
    c = spd(6).to(torch.float16)
    c[2, 4] = math.inf
    c[4, 2] = math.inf
    finding = only(check_covariance_sum(c, 10, SUBJECT, T), "covariance.finite")
    assert finding.severity == "fail"
    assert finding.cause == "fp16-overflow"
    assert finding.value == 2.0
    assert finding.subject == SUBJECT
    assert "(2, 4)" in finding.message
    assert "float16" in finding.message
    assert "maximum" in finding.message


def test_nan_without_inf_in_fp16_sum_is_not_blamed_on_overflow():
    c = spd(4).to(torch.float16)
    c[1, 1] = math.nan
    assert only(check_covariance_sum(c, 10, SUBJECT, T), "covariance.finite").cause == "nonfinite-model"


def test_inf_in_fp32_sum_is_a_nonfinite_model():
    c = spd(5).to(torch.float32)
    c[0, 3] = -math.inf
    outcome = check_covariance_sum(c, 10, SUBJECT, T)
    finding = only(outcome, "covariance.finite")
    assert finding.cause == "nonfinite-model"
    assert "(0, 3)" in finding.message
    assert outcome.metrics["nonfinite"] == 1
    assert "covariance.headroom" not in checks_of(outcome)


def test_overflow_prone_dtypes():
    assert overflow_prone(torch.float16)
    assert not overflow_prone(torch.float32)
    assert not overflow_prone(torch.float64)
    assert not overflow_prone(torch.int64)


def test_bfloat16_has_float32_range_and_is_not_overflow_prone():
    assert not overflow_prone(torch.bfloat16)
    c = spd(4).to(torch.bfloat16)
    c[0, 0] = math.inf
    assert only(check_covariance_sum(c, 10, SUBJECT, T), "covariance.finite").cause == "nonfinite-model"


def test_fp16_sum_at_half_its_range_warns_about_headroom():
    c = torch.eye(4, dtype=torch.float16)
    c[0, 0] = 32768.0  # exactly representable: 50.02% of 65504
    finding = only(check_covariance_sum(c, 10, SUBJECT, T), "covariance.headroom")
    assert finding.severity == "warn"
    assert finding.cause == "fp16-overflow"
    assert finding.value == pytest.approx(32768.0 / 65504.0, rel=1e-12)
    assert finding.limit == T.covariance.headroom_warn_fraction


def test_headroom_below_the_fraction_is_quiet_and_float32_headroom_has_no_fp16_cause():
    c = torch.eye(4, dtype=torch.float16) * 6000.0  # 9.2% of 65504
    assert check_covariance_sum(c, 10, SUBJECT, T).findings == []
    big = torch.eye(3, dtype=torch.float32) * 1e38
    finding = only(check_covariance_sum(big, 10, SUBJECT, T), "covariance.headroom")
    assert finding.cause is None


def test_symmetry_planted_asymmetry_above_limit_in_float64():
    c = spd(6) + 1e-8 * antisymmetric(6)
    outcome = check_covariance_sum(c, 10, SUBJECT, T)
    finding = only(outcome, "covariance.symmetry")
    assert finding.cause == "asymmetric"
    assert finding.limit == pytest.approx(T.covariance.symmetry_eps * eps(torch.float64))
    assert finding.value == pytest.approx(
        torch.linalg.matrix_norm(c - c.T).item() / torch.linalg.matrix_norm(c).item(), rel=1e-9
    )


def test_symmetry_of_exactly_symmetric_matrix_gives_no_finding():
    outcome = check_covariance_sum(spd(6), 10, SUBJECT, T)
    assert "covariance.symmetry" not in checks_of(outcome)
    assert outcome.metrics["asymmetry"] == 0.0


@pytest.mark.parametrize(
    ("dtype", "flagged"),
    [(torch.float16, False), (torch.bfloat16, False), (torch.float32, True), (torch.float64, True)],
)
def test_symmetry_limit_scales_with_the_stored_dtype(dtype, flagged):
    # A 5e-3 relative asymmetry is within fp16/bf16 rounding (capped at 1e-2) but far outside fp32's and fp64's.
    c = spd(6)
    a = antisymmetric(6)
    t = 5e-3 * torch.linalg.matrix_norm(c).item() / (2 * torch.linalg.matrix_norm(a).item())
    stored = (c + t * a).to(dtype)
    outcome = check_covariance_sum(stored, 10, SUBJECT, T)
    assert outcome.metrics["asymmetry"] == pytest.approx(5e-3, rel=0.1)
    assert ("covariance.symmetry" in checks_of(outcome)) is flagged


def test_symmetry_limit_is_capped_for_coarse_dtypes():
    # 1024·eps(bf16) is 8: without the cap no bf16 matrix could ever be flagged as asymmetric.
    c = spd(6)
    a = antisymmetric(6)
    t = 5e-2 * torch.linalg.matrix_norm(c).item() / (2 * torch.linalg.matrix_norm(a).item())
    finding = only(check_covariance_sum((c + t * a).to(torch.bfloat16), 10, SUBJECT, T), "covariance.symmetry")
    assert finding.limit == T.covariance.symmetry_max


def test_structural_checks_measure_the_finite_part():
    # A symmetric pair of overflowed entries is zeroed on both sides: still symmetric, no derived findings.
    c = spd(5)
    c[1, 3] = c[3, 1] = math.inf
    outcome = check_covariance_sum(c, 10, SUBJECT, T)
    assert checks_of(outcome) == ["covariance.finite"]
    assert outcome.metrics["asymmetry"] == 0.0
    # A one-sided inf leaves a finite part that really is asymmetric, and the metric says so.
    c[3, 1] = 0.5
    assert math.isfinite(check_covariance_sum(c, 10, SUBJECT, T).metrics["asymmetry"])


def test_negative_diagonal_is_not_psd():
    c = spd(5)
    c[3, 3] = -1.0
    finding = only(check_covariance_sum(c, 10, SUBJECT, T), "covariance.diagonal")
    assert finding.severity == "fail"
    assert finding.cause == "not-psd"
    assert finding.value == -1.0
    top = torch.diagonal(c).abs().max().item()
    assert finding.limit == pytest.approx(-T.covariance.negative_diagonal_eps * eps(torch.float64) * top)


def test_rounding_sized_negative_diagonal_is_tolerated():
    c = torch.eye(4, dtype=torch.float32)
    c[2, 2] = -10 * eps(torch.float32)  # below 64 eps: rounding of a cancelled sum
    outcome = check_covariance_sum(c, 10, SUBJECT, T)
    assert "covariance.diagonal" not in checks_of(outcome)
    assert outcome.metrics["min_diagonal"] == pytest.approx(-10 * eps(torch.float32))


def _with_dead_rows(d: int, dead: list[int]) -> torch.Tensor:
    c = spd(d)
    for i in dead:
        c[i, :] = 0
        c[:, i] = 0
    return c


def test_many_zero_rows_are_rank_deficient():
    outcome = check_covariance_sum(_with_dead_rows(8, [0, 3, 5]), 10, SUBJECT, T)
    finding = only(outcome, "covariance.dead_units")
    assert finding.severity == "warn"
    assert finding.cause == "rank-deficient"
    assert finding.value == 3 / 8
    assert outcome.metrics["dead_units"] == 3
    assert "3 of 8" in finding.message


def test_few_zero_rows_stay_below_the_warn_fraction():
    outcome = check_covariance_sum(_with_dead_rows(8, [0, 3]), 10, SUBJECT, T)  # exactly 25%: not above
    assert "covariance.dead_units" not in checks_of(outcome)
    assert outcome.metrics["dead_units"] == 2


def test_thresholds_are_configurable():
    strict = Thresholds.from_mapping({"dead_unit_warn_fraction": 0.1, "headroom_warn_fraction": 0.01})
    c = torch.eye(4, dtype=torch.float16) * 1000.0
    c[1, 1] = 0.0
    found = checks_of(check_covariance_sum(c, 10, SUBJECT, strict))
    assert sorted(found) == ["covariance.dead_units", "covariance.headroom"]
    assert check_covariance_sum(c, 10, SUBJECT, T).findings == []


def test_examples_processed_zero_count_fails():
    outcome = check_examples_processed({"fc1": 0.0, "fc2": 64.0}, {"fc1": 0.0, "fc2": 64.0})
    finding = only(outcome, "covariance.examples")
    assert finding.severity == "fail"
    assert finding.subject == "fc1"
    assert finding.value == 0.0
    assert outcome.metrics["activation_examples"] == {"fc1": 0.0, "fc2": 64.0}


def test_examples_processed_missing_module_fails():
    finding = only(check_examples_processed({"fc1": 64.0}, {}), "covariance.examples")
    assert finding.subject == "fc1"


def test_examples_processed_mismatch_warns():
    outcome = check_examples_processed({"fc1": 64.0, "fc2": 64.0}, {"fc1": 60.0, "fc2": 64.0})
    finding = only(outcome, "covariance.examples_equal")
    assert finding.severity == "warn"
    assert finding.subject == "fc1"
    assert finding.value == 4.0
    assert len(outcome.findings) == 1


def test_examples_processed_equal_counts_across_different_modules_is_fine():
    assert check_examples_processed({"conv": 6400.0, "fc": 64.0}, {"conv": 6400.0, "fc": 64.0}).findings == []


def test_findings_are_valid_records():
    c = spd(8) + 1e-6 * antisymmetric(8)
    c[:3, :] = 0
    c[:, :3] = 0
    c[4, 4] = -5.0
    outcome = check_covariance_sum(c, 10, SUBJECT, T)
    assert sorted(checks_of(outcome)) == ["covariance.dead_units", "covariance.diagonal", "covariance.symmetry"]
    assert_valid(outcome.findings)
    assert all(f.stage == "covariance" for f in outcome.findings)
