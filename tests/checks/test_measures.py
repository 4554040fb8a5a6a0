"""The pure measurements, each against an exact float64 reference on a constructed matrix."""

from __future__ import annotations

import math

import pytest
import torch

from influence_doctor.checks import measures
from influence_doctor.checks.measures import (
    EXACT_FROBENIUS_LIMIT,
    damped_condition,
    dead_rows,
    effective_rank,
    first_nonfinite_position,
    max_abs_finite,
    nonfinite_count,
    orthogonality_error,
    reconstruction_error,
    relative_frobenius,
    robust_z_max,
    spectrum_extremes,
    symmetry_error,
)
from tests.checks.helpers import antisymmetric, generator, householder, orthonormal, spd

F64 = torch.float64


# --- symmetry -----------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1e-12, 1e-6, 0.3])
def test_symmetry_error_of_planted_antisymmetric_part_is_exact(t):
    c, a = spd(7), antisymmetric(7)
    m = c + t * a
    # (C+tA) − (C+tA)ᵀ = 2tA because Cᵀ = C and Aᵀ = −A.
    expected = 2 * t * torch.linalg.matrix_norm(a).item() / torch.linalg.matrix_norm(m).item()
    assert symmetry_error(m) == pytest.approx(expected, rel=1e-9)


def test_symmetry_error_is_zero_for_a_symmetric_matrix_and_nan_when_undefined():
    c = spd(5)
    assert symmetry_error(c) == 0.0
    assert symmetry_error(c.to(torch.float16)) == 0.0
    assert math.isnan(symmetry_error(torch.ones(3, 4)))
    assert math.isnan(symmetry_error(torch.ones(4)))
    assert math.isnan(symmetry_error(torch.ones(0, 0)))


def test_relative_frobenius_edge_values():
    assert relative_frobenius(torch.zeros(3), torch.zeros(3)) == 0.0
    assert relative_frobenius(torch.ones(3), torch.zeros(3)) == math.inf
    assert relative_frobenius(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 10.0])) == pytest.approx(0.5)


# --- orthogonality ------------------------------------------------------------------------------


def test_orthogonality_error_of_exact_orthonormal_matrix_is_rounding():
    q = orthonormal(40)
    assert orthogonality_error(q) < 20 * torch.finfo(F64).eps


@pytest.mark.parametrize("d", [1, 6, 50])
def test_orthogonality_error_of_column_scaled_q_is_exact(d):
    # Q·diag(c) has (Q·diag(c))ᵀ(Q·diag(c)) − I = diag(c² − 1) exactly.
    q = orthonormal(d, seed=3)
    c = 1 + 0.01 * torch.randn(d, dtype=F64, generator=generator(4))
    expected = torch.linalg.vector_norm(c**2 - 1).item() / math.sqrt(d)
    assert orthogonality_error(q * c) == pytest.approx(expected, rel=1e-9)


def test_orthogonality_error_nan_for_non_square_or_empty():
    assert math.isnan(orthogonality_error(torch.ones(2, 3)))
    assert math.isnan(orthogonality_error(torch.ones(0, 0)))
    assert math.isnan(orthogonality_error(torch.ones(3)))


def _rank_two_perturbed_householder(d: int, t: float) -> tuple[torch.Tensor, float]:
    """Q' = H + t·u·wᵀ and the exact ‖Q'ᵀQ' − I‖_F/√d, formed in O(d²)."""
    h, _ = householder(d, seed=5)
    u = torch.randn(d, dtype=F64, generator=generator(6))
    w = torch.randn(d, dtype=F64, generator=generator(7))
    hu = h @ u
    gram_minus_identity = t * torch.outer(hu, w) + t * torch.outer(w, hu) + t * t * u.dot(u) * torch.outer(w, w)
    return h + t * torch.outer(u, w), torch.linalg.matrix_norm(gram_minus_identity).item() / math.sqrt(d)


def test_orthogonality_probe_estimate_above_exact_limit_is_close_to_exact():
    d = EXACT_FROBENIUS_LIMIT + 76
    q, exact = _rank_two_perturbed_householder(d, 1e-3)
    assert exact > 1e-4  # the perturbation is far above rounding
    estimate = orthogonality_error(q)
    assert estimate == pytest.approx(exact, rel=0.3)


def test_orthogonality_probe_estimate_matches_exact_formula_at_the_switch(monkeypatch):
    # The same matrix measured exactly (limit raised) and by probes (limit lowered) must agree.
    q, exact = _rank_two_perturbed_householder(300, 1e-2)
    assert orthogonality_error(q) == pytest.approx(exact, rel=1e-9)
    monkeypatch.setattr(measures, "EXACT_FROBENIUS_LIMIT", 10)
    assert orthogonality_error(q) == pytest.approx(exact, rel=0.3)
    assert orthogonality_error(householder(300)[0]) < 1e-13


# --- reconstruction -----------------------------------------------------------------------------


def test_reconstruction_error_of_exact_eigendecomposition_is_rounding():
    q = orthonormal(12, seed=2)
    lam = torch.linspace(0.5, 4.0, 12, dtype=F64)
    c = (q * lam) @ q.T
    assert reconstruction_error(q, lam, c) < 50 * torch.finfo(F64).eps


def test_reconstruction_error_of_perturbed_matrix_is_exact():
    q = orthonormal(10, seed=2)
    lam = torch.linspace(1.0, 3.0, 10, dtype=F64)
    c = (q * lam) @ q.T
    s = spd(10, seed=9)
    perturbed = c + 1e-4 * s
    expected = torch.linalg.matrix_norm(1e-4 * s).item() / torch.linalg.matrix_norm(perturbed).item()
    assert reconstruction_error(q, lam, perturbed) == pytest.approx(expected, rel=1e-6)


def test_reconstruction_probe_estimate_above_exact_limit():
    d = EXACT_FROBENIUS_LIMIT + 50
    h, v = householder(d, seed=8)
    lam = torch.linspace(1.0, 2.0, d, dtype=F64)
    # HΛH = Λ − 2v(Λv)ᵀ − 2(Λv)vᵀ + 4(vᵀΛv)vvᵀ, built without a d³ product.
    lv = lam * v
    c = torch.diag(lam) - 2 * torch.outer(v, lv) - 2 * torch.outer(lv, v) + 4 * v.dot(lv) * torch.outer(v, v)
    assert reconstruction_error(h, lam, c) < 1e-12
    noise = torch.randn(d, d, dtype=F64, generator=generator(10))
    perturbation = 1e-3 * (noise + noise.T)
    exact = torch.linalg.matrix_norm(perturbation).item() / torch.linalg.matrix_norm(c + perturbation).item()
    assert reconstruction_error(h, lam, c + perturbation) == pytest.approx(exact, rel=0.3)


def test_reconstruction_error_nan_on_mismatched_shapes():
    q = orthonormal(4)
    assert math.isnan(reconstruction_error(q, torch.ones(3), torch.eye(4)))
    assert math.isnan(reconstruction_error(q, torch.ones(4), torch.eye(5)))
    assert math.isnan(reconstruction_error(torch.ones(0, 0), torch.ones(0), torch.ones(0, 0)))


@pytest.mark.parametrize("shape", [(3, 4), (4, 3), (2, 1)])
def test_reconstruction_error_non_square_vectors_return_nan(shape):
    assert math.isnan(reconstruction_error(torch.ones(shape), torch.ones(shape[0]), torch.ones(shape)))


# --- rank, spectrum, conditioning ---------------------------------------------------------------


def test_effective_rank_of_computed_u_ut_is_r():
    ranks = []
    for d, r in [(12, 1), (10, 3), (12, 5), (64, 8), (16, 16)]:
        u = torch.randn(d, r, dtype=F64, generator=generator(r))
        c = u @ u.T
        ranks.append((d, r, effective_rank(torch.linalg.eigvalsh(0.5 * (c + c.T)), 1.0, F64)))
    assert all(rank == r for _d, r, rank in ranks), ranks


def test_effective_rank_counts_values_clearly_above_rounding():
    # Values 1e3 eps above or below the scale count the same under any d-, √d- or 1-scaled eps rule.
    values = torch.tensor([0.0, 1e-20, 1e-9, 1.0, 2.0], dtype=F64)
    assert effective_rank(values, 1.0, F64) == 3
    assert effective_rank(values.to(torch.float32), 1.0, torch.float32) == 2
    assert effective_rank(values, 1.0, torch.float16) == 2
    assert effective_rank(torch.tensor([0.0, -1.0]), 1.0, F64) == 0
    assert effective_rank(torch.tensor([math.nan, math.inf, 1.0]), 1.0, F64) == 1
    assert effective_rank(torch.ones(0), 1.0, F64) == 0


def test_effective_rank_tolerance_is_configurable():
    values = torch.tensor([1e-6, 1e-3, 1.0], dtype=F64)
    assert effective_rank(values, 1.0, F64) == 3
    assert effective_rank(values, 1e12, F64) == 2  # 1e12·eps ≈ 2e-4 (times a scale ≈ 1): drops 1e-6, keeps 1e-3


def test_spectrum_extremes_ignore_nonfinite():
    assert spectrum_extremes(torch.tensor([3.0, math.nan, -1.0, math.inf, 1.0])) == (-1.0, 3.0, 1.0)
    assert all(math.isnan(x) for x in spectrum_extremes(torch.tensor([math.nan])))


@pytest.mark.parametrize(
    ("smallest", "largest", "damping", "expected"),
    [
        (1.0, 10.0, 0.5, 10.5 / 1.5),
        (0.0, 1.0, 1e-8, (1.0 + 1e-8) / 1e-8),
        (2.0, 2.0, 0.0, 1.0),
        (-1.0, 10.0, 0.5, math.inf),
        (-1.0, 10.0, 1.0, math.inf),
        (0.0, 5.0, 0.0, math.inf),
    ],
)
def test_damped_condition_exact(smallest, largest, damping, expected):
    assert damped_condition(smallest, largest, damping) == expected


def test_damped_condition_nan_in_nan_out():
    assert math.isnan(damped_condition(math.nan, 1.0, 0.1))
    assert math.isnan(damped_condition(0.0, 1.0, math.nan))


# --- robust z -----------------------------------------------------------------------------------


def test_robust_z_max_by_hand():
    # median 3, |x − 3| = [2, 1, 0, 1, 97], MAD = 1.
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    assert robust_z_max(x) == pytest.approx(97 / 1.4826, rel=1e-12)
    with_junk = torch.tensor([1.0, math.nan, 2.0, 3.0, math.inf, 4.0, 100.0, -math.inf])
    assert robust_z_max(with_junk) == pytest.approx(97 / 1.4826, rel=1e-12)


def test_robust_z_max_nan_when_mad_is_zero_or_too_few_values():
    assert math.isnan(robust_z_max(torch.tensor([5.0, 5.0, 5.0, 5.0, 9.0])))
    assert math.isnan(robust_z_max(torch.tensor([1.0, 2.0])))
    assert math.isnan(robust_z_max(torch.tensor([math.nan] * 5)))


# --- dead rows, non-finite entries --------------------------------------------------------------


def test_dead_rows_counts_planted_zero_rows():
    c = spd(6)
    for i in (1, 4):
        c[i, :] = 0
        c[:, i] = 0
    assert dead_rows(c, 1.0) == 2
    assert dead_rows(spd(6), 1.0) == 0


def test_dead_rows_tolerance_is_eps_of_the_dtype_times_max():
    c = torch.eye(4, dtype=F64)
    c[2, 2] = 1e-20  # far below eps·max in every dtype
    c[3, 3] = 1e-10  # below float32's eps, above float64's
    assert dead_rows(c, 1.0) == 1
    assert dead_rows(c.to(torch.float32), 1.0) == 2
    assert dead_rows(torch.zeros(0, 0), 1.0) == 0


def test_first_nonfinite_position_names_the_first_in_row_major_order():
    t = torch.zeros(4, 5)
    t[3, 0] = math.nan
    t[2, 3] = math.inf
    assert first_nonfinite_position(t) == (2, 3)
    assert nonfinite_count(t) == 2
    cube = torch.zeros(2, 3, 4, dtype=torch.float16)
    cube[1, 2, 1] = -math.inf
    assert first_nonfinite_position(cube) == (1, 2, 1)
    assert first_nonfinite_position(torch.ones(3, 3)) is None


def test_nonfinite_count_and_max_abs_finite():
    t = torch.tensor([1.0, -7.0, math.inf, math.nan, -math.inf, 3.0], dtype=torch.bfloat16)
    assert nonfinite_count(t) == 3
    assert max_abs_finite(t) == 7.0
    assert nonfinite_count(torch.ones(3, dtype=torch.int64)) == 0
    assert max_abs_finite(torch.tensor([math.nan])) == 0.0
