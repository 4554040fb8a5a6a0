"""Checks on stored eigenpairs, against exact float64 eigendecompositions of constructed matrices."""

from __future__ import annotations

import math

import pytest
import torch

from influence_doctor.checks.eigendecomposition import check_eigenpairs, coarsest
from influence_doctor.checks.thresholds import Thresholds, eps
from tests.checks.helpers import assert_valid, checks_of, only, orthonormal, spd

T = Thresholds()
F64 = torch.float64
SUBJECT = "fc1/activation_eigenvectors"


def _exact(d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = spd(d, seed)
    values, vectors = torch.linalg.eigh(c)
    return values, vectors, c


def test_exact_float64_eigh_has_no_findings():
    values, vectors, c = _exact()
    outcome = check_eigenpairs(values, vectors, SUBJECT, T, covariance=c)
    assert outcome.findings == []
    assert outcome.metrics["orthogonality_error"] < 10 * eps(F64)
    assert outcome.metrics["reconstruction_error"] < 10 * eps(F64)
    assert outcome.metrics["effective_rank"] == 8
    assert outcome.metrics["rank_fraction"] == 1.0
    assert outcome.metrics["condition_number"] == pytest.approx(values.max().item() / values.min().item())
    assert outcome.metrics["min_eigenvalue"] == values.min().item()


def test_eigenvectors_stored_in_float16_for_float32_preconditioning_are_dtype_drift():
    values, vectors, c = _exact()
    outcome = check_eigenpairs(
        values, vectors.to(torch.float16), SUBJECT, T, covariance=c, precondition_dtype=torch.float32
    )
    finding = only(outcome, "eigendecomposition.stored_dtype")
    assert finding.severity == "fail"
    assert finding.cause == "dtype-drift"
    assert finding.limit == pytest.approx(T.eigendecomposition.orthogonality_eps * eps(torch.float32))
    assert "float16" in finding.message and "float32" in finding.message
    assert outcome.metrics["stored_dtype"] == "float16"


def test_eigenvectors_stored_in_float32_for_float32_preconditioning_are_fine():
    values, vectors, c = _exact()
    outcome = check_eigenpairs(values, vectors.to(torch.float32), SUBJECT, T, covariance=c)
    assert outcome.findings == []
    assert outcome.metrics["orthogonality_error"] < T.eigendecomposition.orthogonality_eps * eps(torch.float32)


def test_float16_storage_is_fine_when_preconditioning_is_float16_too():
    values, vectors, _c = _exact()
    outcome = check_eigenpairs(values, vectors.to(torch.float16), SUBJECT, T, precondition_dtype=torch.float16)
    assert outcome.findings == []


def test_non_orthonormal_float64_vectors_are_inaccurate_not_drift():
    values, vectors, _c = _exact()
    scaled = vectors * torch.linspace(0.99, 1.01, 8, dtype=F64)
    finding = only(check_eigenpairs(values, scaled, SUBJECT, T), "eigendecomposition.orthogonality")
    assert finding.cause == "eigendecomposition-inaccurate"
    expected = torch.linalg.vector_norm(torch.linspace(0.99, 1.01, 8, dtype=F64) ** 2 - 1).item() / math.sqrt(8)
    assert finding.value == pytest.approx(expected, rel=1e-9)


def test_nan_eigenvalues_mean_eigendecomposition_failed():
    values, vectors, c = _exact()
    values[3] = math.nan
    outcome = check_eigenpairs(values, vectors, SUBJECT, T, covariance=c)
    finding = only(outcome, "eigendecomposition.finite")
    assert finding.severity == "fail"
    assert finding.cause == "eigendecomposition-failed"
    assert finding.value == 1.0
    assert len(outcome.findings) == 1  # nothing else is measured on garbage


def test_inf_eigenvectors_are_counted_too():
    values, vectors, _c = _exact()
    vectors[0, :2] = math.inf
    assert only(check_eigenpairs(values, vectors, SUBJECT, T), "eigendecomposition.finite").value == 2.0


def test_clearly_negative_eigenvalue_is_not_psd():
    q = orthonormal(6, seed=4)
    values = torch.tensor([-0.5, 0.5, 1.0, 2.0, 3.0, 4.0], dtype=F64)
    c = (q * values) @ q.T
    outcome = check_eigenpairs(values, q, SUBJECT, T, covariance=c)
    finding = only(outcome, "eigendecomposition.psd")
    assert finding.cause == "not-psd"
    assert finding.value == -0.5
    assert finding.limit == pytest.approx(-T.eigendecomposition.negative_eigenvalue_eps * 6 * eps(F64) * 4.0)
    assert outcome.metrics["condition_number"] == math.inf


def test_rounding_sized_negative_eigenvalue_is_tolerated():
    values = torch.tensor([-1e-15, 1.0, 2.0, 3.0], dtype=F64)  # above −64·4·eps·3 ≈ −1.7e-13
    outcome = check_eigenpairs(values, torch.eye(4, dtype=F64), SUBJECT, T)
    assert "eigendecomposition.psd" not in checks_of(outcome)


@pytest.mark.parametrize(("d", "r"), [(10, 3), (12, 5)])
def test_rank_r_matrix_has_effective_rank_r_and_warns_below_half(d, r):
    q = orthonormal(d, seed=r)
    values = torch.zeros(d, dtype=F64)
    values[d - r :] = torch.linspace(1.0, 5.0, r, dtype=F64)
    c = (q * values) @ q.T
    outcome = check_eigenpairs(values, q, SUBJECT, T, covariance=0.5 * (c + c.T))
    assert outcome.metrics["effective_rank"] == r
    assert outcome.metrics["rank_fraction"] == pytest.approx(r / d)
    finding = only(outcome, "eigendecomposition.effective_rank")
    assert finding.severity == "warn"
    assert finding.cause == "rank-deficient"
    assert finding.value == float(r)
    assert finding.limit == T.eigendecomposition.rank_deficient_fraction * d
    assert f"{r} of {d}" in finding.message
    assert len(outcome.findings) == 1


def test_rank_of_exactly_half_is_not_flagged():
    values = torch.tensor([0.0] * 4 + [1.0, 2.0, 3.0, 4.0], dtype=F64)
    outcome = check_eigenpairs(values, torch.eye(8, dtype=F64), SUBJECT, T)
    assert outcome.metrics["effective_rank"] == 4
    assert outcome.findings == []


def test_perturbed_reconstruction_is_inaccurate():
    values, vectors, c = _exact()
    noise = spd(8, seed=11)
    perturbed = c + 1e-6 * noise
    outcome = check_eigenpairs(values, vectors, SUBJECT, T, covariance=perturbed)
    finding = only(outcome, "eigendecomposition.reconstruction")
    assert finding.cause == "eigendecomposition-inaccurate"
    expected = torch.linalg.matrix_norm(1e-6 * noise).item() / torch.linalg.matrix_norm(perturbed).item()
    assert finding.value == pytest.approx(expected, rel=1e-4)
    assert finding.limit == pytest.approx(T.eigendecomposition.reconstruction_eps * math.sqrt(8) * eps(F64))


def test_reconstruction_limit_follows_the_coarser_of_compute_and_stored_dtype():
    # The same 1e-6 error fails against float64 eigh but is float32 rounding when eigh ran in float32.
    values, vectors, c = _exact()
    perturbed = c + 1e-6 * spd(8, seed=11)
    outcome = check_eigenpairs(values, vectors, SUBJECT, T, covariance=perturbed, compute_dtype=torch.float32)
    assert "eigendecomposition.reconstruction" not in checks_of(outcome)


def test_covariance_of_another_shape_is_ignored():
    values, vectors, _c = _exact()
    outcome = check_eigenpairs(values, vectors, SUBJECT, T, covariance=torch.eye(5, dtype=F64))
    assert "reconstruction_error" not in outcome.metrics
    assert outcome.findings == []


def test_mismatched_values_and_vectors_measure_nothing():
    outcome = check_eigenpairs(torch.ones(4), torch.eye(5), SUBJECT, T)
    assert outcome.findings == []
    assert "orthogonality_error" not in outcome.metrics


def test_coarsest_picks_the_largest_epsilon():
    assert coarsest(torch.float64, torch.float16, torch.float32) == torch.float16
    assert coarsest(torch.float16, torch.bfloat16) == torch.bfloat16
    assert coarsest(None, torch.int64) == torch.float64


def test_well_conditioned_bf16_factor_is_full_rank():
    d = 128
    values = torch.linspace(1.0, 2.0, d, dtype=F64)
    outcome = check_eigenpairs(values, torch.eye(d), SUBJECT, T, source_dtype=torch.bfloat16)
    assert outcome.metrics["effective_rank"] == d
    assert outcome.findings == []


def test_clearly_negative_eigenvalue_of_fp16_sourced_factor_is_not_psd():
    d = 16
    values = torch.ones(d, dtype=F64)
    values[0] = -0.5
    outcome = check_eigenpairs(values, torch.eye(d), SUBJECT, T, source_dtype=torch.float16)
    assert only(outcome, "eigendecomposition.psd").cause == "not-psd"


def test_all_findings_are_valid():
    values, vectors, c = _exact()
    values[0] = -5.0
    outcome = check_eigenpairs(values, vectors.to(torch.float16), SUBJECT, T, covariance=c)
    assert {"eigendecomposition.stored_dtype", "eigendecomposition.psd"} <= set(checks_of(outcome))
    assert_valid(outcome.findings)
    assert all(f.stage == "eigendecomposition" and f.subject == SUBJECT for f in outcome.findings)


def test_a_large_float64_eigendecomposition_is_orthonormal_to_its_own_rounding():
    """eigh's orthogonality error grows like √d·eps: a 513-wide float64 basis (≈9 eps) is not a failure."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(513, 64, generator=generator, dtype=torch.float64)
    values, vectors = torch.linalg.eigh(a @ a.T)
    outcome = check_eigenpairs(
        values,
        vectors,
        "m/activation_eigenvectors",
        T,
        compute_dtype=torch.float64,
        precondition_dtype=torch.float64,
    )
    assert "eigendecomposition.orthogonality" not in checks_of(outcome)
    assert outcome.metrics["orthogonality_error"] > 2 * eps(torch.float64)  # beyond storage rounding alone


def test_the_orthogonality_limit_adds_the_solvers_error_to_the_storage_rounding():
    q = orthonormal(16, seed=3).float()
    broken = q.clone()
    broken[:, 0] *= 1.01
    (finding,) = [f for f in check_eigenpairs(torch.ones(16), broken, "m", T).findings if "orthogonality" in f.check]
    assert finding.limit == pytest.approx(
        T.eigendecomposition.orthogonality_eps * (eps(torch.float32) + 4 * eps(torch.float64))
    )
