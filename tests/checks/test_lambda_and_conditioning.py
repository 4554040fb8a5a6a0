"""EK-FAC Lambda checks and the conditioning of the damped spectrum, on spectra with known extremes."""

from __future__ import annotations

import math

import pytest
import torch

from influence_doctor.checks.conditioning import check_damped_spectrum
from influence_doctor.checks.lambda_matrix import check_lambda
from influence_doctor.checks.spectra import HEURISTIC_DAMPING_SCALE, effective_damping
from influence_doctor.checks.thresholds import Thresholds, eps
from tests.checks.helpers import assert_valid, checks_of, only

T = Thresholds()
F32 = torch.float32
EPS32 = eps(F32)
SUBJECT = "fc1/lambda_matrix"


def _lambda_sum(values: list[float], count: int = 4, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Λ stored as a sum over `count` examples (count a power of two, so Λ = sum/count exactly)."""
    return (torch.tensor(values, dtype=torch.float64) * count).to(dtype).reshape(2, -1)


def test_condition_after_damping_is_exact():
    outcome = check_lambda(_lambda_sum([0.5, 1.0, 2.0, 8.0]), 4, SUBJECT, T, damping_factor=0.1)
    assert outcome.metrics["condition_after_damping"] == (8.0 + 0.1) / (0.5 + 0.1)
    assert outcome.metrics["damping"] == 0.1
    assert outcome.metrics["min_eigenvalue"] == 0.5
    assert outcome.metrics["max_eigenvalue"] == 8.0
    assert outcome.metrics["examples"] == 4.0
    assert outcome.findings == []


def test_heuristic_damping_is_a_tenth_of_the_mean_like_kronfluence():
    values = [0.5, 1.0, 2.0, 8.0]
    outcome = check_lambda(_lambda_sum(values), 4, SUBJECT, T, damping_factor=None)
    delta = 0.1 * sum(values) / len(values)
    assert HEURISTIC_DAMPING_SCALE == 0.1
    assert outcome.metrics["damping"] == pytest.approx(delta, rel=1e-15)
    assert outcome.metrics["condition_after_damping"] == pytest.approx((8.0 + delta) / (0.5 + delta), rel=1e-14)
    assert effective_damping(None, 3.0) == pytest.approx(0.3)
    assert effective_damping(1e-8, 3.0) == 1e-8


def test_tiny_damping_on_a_singular_spectrum_is_only_a_hypothesis():
    values = [0.0, 0.25, 0.5, 1.0]
    outcome = check_lambda(_lambda_sum(values), 4, SUBJECT, T, damping_factor=1e-8)
    finding = only(outcome, "lambda.condition")
    assert EPS32 * 1.0 > 1e-8  # δ vanishes next to λmax in float32
    assert finding.severity == "warn"  # a bound: only the float64 re-run can say precision is lost
    assert finding.cause == "tiny-damping"
    assert finding.value == (1.0 + 1e-8) / 1e-8
    assert finding.limit == pytest.approx(T.eigendecomposition.max_condition_error / EPS32)
    assert outcome.metrics["damping_floor"] == pytest.approx(T.eigendecomposition.damping_floor_eps * EPS32 * 1.0)


def test_large_damping_leaves_no_finding():
    outcome = check_lambda(_lambda_sum([0.0, 0.25, 0.5, 1.0]), 4, SUBJECT, T, damping_factor=1.0)
    assert outcome.findings == []
    assert outcome.metrics["condition_after_damping"] == 2.0


def test_ill_conditioned_spectrum_with_damping_above_the_floor_warns():
    outcome = check_lambda(_lambda_sum([0.0, 0.25, 0.5, 1.0]), 4, SUBJECT, T, damping_factor=1e-6)
    finding = only(outcome, "lambda.condition")
    assert finding.severity == "warn"  # cond·eps32 ≈ 0.12: between 1% and 100%
    assert finding.cause == "ill-conditioned"
    assert finding.value == pytest.approx((1.0 + 1e-6) / 1e-6, rel=1e-12)
    assert finding.limit == pytest.approx(T.eigendecomposition.max_condition_error / EPS32)


def test_the_precondition_dtype_decides():
    values = _lambda_sum([0.0, 0.25, 0.5, 1.0])
    # In float32 a damping of 1e-8 is below eps·λmax: it is also reported as damping nothing.
    assert checks_of(check_lambda(values, 4, SUBJECT, T, damping_factor=1e-8)) == [
        "lambda.damping_floor",
        "lambda.condition",
    ]
    assert check_lambda(values, 4, SUBJECT, T, damping_factor=1e-8, precondition_dtype=torch.float64).findings == []


def _spectrum_with_condition(condition: float, damping: float = 1e-3, largest: float = 1.0) -> float:
    """The smallest eigenvalue that gives cond(Λ+δ) = condition."""
    return (largest + damping) / condition - damping


@pytest.mark.parametrize(
    ("error", "severity"),
    [(0.0099, None), (0.0101, "warn"), (0.5, "warn"), (0.99, "warn"), (1.01, "warn"), (100.0, "warn")],
)
def test_condition_is_a_warning_never_a_failure(error, severity):
    smallest = _spectrum_with_condition(error / EPS32)
    outcome = check_damped_spectrum(smallest, 1.0, 0.5, 1e-3, F32, "m", "lambda", T)
    assert outcome.metrics["condition_after_damping"] == pytest.approx(error / EPS32, rel=1e-9)
    if severity is None:
        assert outcome.findings == []
        return
    finding = only(outcome, "lambda.condition")
    assert finding.severity == severity
    assert finding.cause == "ill-conditioned"  # δ = 1e-3 is far above eps32·λmax
    assert finding.limit == pytest.approx(T.eigendecomposition.max_condition_error / EPS32)


def test_condition_limits_are_configurable():
    strict = Thresholds.from_mapping({"max_condition_error": 1e-4})
    smallest = _spectrum_with_condition(5e-4 / EPS32)
    assert check_damped_spectrum(smallest, 1.0, 0.5, 1e-3, F32, "m", "lambda", T).findings == []
    finding = only(check_damped_spectrum(smallest, 1.0, 0.5, 1e-3, F32, "m", "lambda", strict), "lambda.condition")
    assert finding.severity == "warn"


def test_negative_spectrum_reaching_zero_after_damping_is_infinite_condition():
    outcome = check_damped_spectrum(-1e-3, 1.0, 0.5, 1e-3, F32, "m", "eigendecomposition", T)
    finding = only(outcome, "eigendecomposition.condition")
    assert finding.value == math.inf
    assert finding.severity == "warn"
    assert finding.stage == "eigendecomposition"


def test_nan_spectrum_is_recorded_not_judged():
    outcome = check_damped_spectrum(math.nan, math.nan, math.nan, 1e-8, F32, "m", "lambda", T)
    assert outcome.findings == []
    assert math.isnan(outcome.metrics["condition_after_damping"])


def test_inf_in_lambda_sum_is_not_finite():
    lam = _lambda_sum([0.5, 1.0, 2.0, 8.0], dtype=F32)
    lam[1, 0] = math.inf
    outcome = check_lambda(lam, 4, SUBJECT, T)
    finding = only(outcome, "lambda.finite")
    assert finding.severity == "fail"
    assert finding.cause is None  # float32 Λ from float32 inputs: not an fp16 overflow
    assert finding.value == 1.0
    assert len(outcome.findings) == 1
    assert "condition_after_damping" not in outcome.metrics


def test_inf_in_lambda_is_overflow_when_inputs_are_low_precision():
    lam = _lambda_sum([0.5, 1.0, 2.0, 8.0], dtype=F32)
    lam[0, 0] = math.inf
    assert only(check_lambda(lam, 4, SUBJECT, T, low_precision_inputs=True), "lambda.finite").cause == "fp16-overflow"
    assert only(check_lambda(lam.half(), 4, SUBJECT, T), "lambda.finite").cause == "fp16-overflow"


def test_negative_entries_are_not_psd():
    outcome = check_lambda(_lambda_sum([-0.125, 1.0, 2.0, 8.0], dtype=F32), 4, SUBJECT, T, damping_factor=1.0)
    finding = only(outcome, "lambda.nonnegative")
    assert finding.severity == "fail"
    assert finding.cause == "not-psd"
    assert finding.value == -0.125
    assert finding.limit == pytest.approx(-T.eigendecomposition.negative_eigenvalue_eps * EPS32 * 8.0)


def test_rounding_sized_negative_entries_are_tolerated():
    outcome = check_lambda(_lambda_sum([-1e-10, 1.0, 2.0, 8.0], dtype=F32), 4, SUBJECT, T, damping_factor=1.0)
    assert "lambda.nonnegative" not in checks_of(outcome)


def test_damping_dominated_share_is_exact():
    values = [0.1, 0.2, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    lam = _lambda_sum(values)
    assert check_lambda(lam, 4, SUBJECT, T, damping_factor=1e-8).metrics["damping_dominated_share"] == 0.0
    assert check_lambda(lam, 4, SUBJECT, T, damping_factor=1.5).metrics["damping_dominated_share"] == 3 / 8
    # Heuristic δ = 0.1 × mean = 0.26625: two entries lie below it.
    assert check_lambda(lam, 4, SUBJECT, T, damping_factor=None).metrics["damping_dominated_share"] == 2 / 8


def test_no_examples_or_empty_lambda_measures_nothing():
    assert check_lambda(_lambda_sum([1.0, 2.0]), 0, SUBJECT, T).metrics == {"dtype": "float64", "examples": 0.0}
    assert check_lambda(torch.ones(0), 4, SUBJECT, T).findings == []


def test_findings_are_valid():
    outcome = check_lambda(_lambda_sum([-1.0, 0.0, 1.0, 2.0]), 4, SUBJECT, T, damping_factor=1e-8)
    assert set(checks_of(outcome)) == {"lambda.nonnegative", "lambda.condition", "lambda.damping_floor"}
    assert_valid(outcome.findings)
    assert all(f.stage == "lambda" and f.subject == SUBJECT for f in outcome.findings)
