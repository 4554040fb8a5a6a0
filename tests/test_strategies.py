"""The public hypothesis strategies deliver the matrices they promise, and the checks catch them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from influence_doctor.checks.covariance import check_covariance_sum
from influence_doctor.checks.measures import effective_rank, symmetry_error
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.strategies import (
    asymmetric_matrices,
    ill_conditioned_matrices,
    near_overflow_matrices,
    rank_deficient_matrices,
)

FAST = settings(max_examples=20, deadline=None)


@FAST
@given(ill_conditioned_matrices(size=6, condition=1e10))
def test_ill_conditioned_has_the_promised_condition_number(matrix):
    values = torch.linalg.eigvalsh(matrix)
    assert float(values.max() / values.min()) == pytest.approx(1e10, rel=1e-3)


@FAST
@given(rank_deficient_matrices(size=7, rank=3))
def test_rank_deficient_has_the_promised_rank(matrix):
    assert effective_rank(torch.linalg.eigvalsh(matrix), 1.0, torch.float64) == 3


@FAST
@given(near_overflow_matrices(size=5, dtype=torch.float16))
def test_near_overflow_sits_at_the_dtype_max_and_is_flagged(matrix):
    assert matrix.dtype == torch.float16
    assert torch.isfinite(matrix).all()
    assert float(matrix.abs().max()) > 0.8 * 65504
    outcome = check_covariance_sum(matrix, 10, "m/activation_covariance", Thresholds())
    assert [f.check for f in outcome.findings] == ["covariance.headroom"]


@FAST
@given(asymmetric_matrices(size=6, asymmetry=0.05))
def test_asymmetric_has_the_promised_asymmetry(matrix):
    assert symmetry_error(matrix) == pytest.approx(0.05, rel=1e-6)
    outcome = check_covariance_sum(matrix, 10, "m/activation_covariance", Thresholds())
    assert "covariance.symmetry" in [f.check for f in outcome.findings]
