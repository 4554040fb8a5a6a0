"""Hypothesis strategies for the matrices that break influence pipelines, for users' own property tests.

    from hypothesis import given
    from influence_doctor.strategies import ill_conditioned_matrices

    @given(ill_conditioned_matrices(size=8, condition=1e10))
    def test_my_solver(matrix): ...

Every matrix is a float64 torch tensor built as Q·diag(λ)·Qᵀ from a drawn orthogonal Q, so its spectrum
is exactly what the strategy promises (before the cast to `dtype`).
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

_seeds = st.integers(min_value=0, max_value=2**31 - 1)


def _orthogonal(size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _from_spectrum(values: torch.Tensor, seed: int) -> torch.Tensor:
    q = _orthogonal(values.numel(), seed)
    matrix = (q * values) @ q.T
    return 0.5 * (matrix + matrix.T)


@st.composite
def ill_conditioned_matrices(draw, size: int = 8, condition: float = 1e12, dtype: torch.dtype = torch.float64):
    """Symmetric positive definite, eigenvalues log-spaced from 1 down to 1/condition."""
    seed = draw(_seeds)
    values = torch.logspace(0.0, -math.log10(condition), size, dtype=torch.float64)
    return _from_spectrum(values, seed).to(dtype)


@st.composite
def rank_deficient_matrices(draw, size: int = 8, rank: int | None = None, dtype: torch.dtype = torch.float64):
    """Positive semidefinite with exactly `rank` non-zero eigenvalues (drawn when not given)."""
    rank = draw(st.integers(min_value=0, max_value=size - 1)) if rank is None else rank
    seed = draw(_seeds)
    values = torch.zeros(size, dtype=torch.float64)
    values[:rank] = torch.linspace(1.0, 0.1, rank, dtype=torch.float64) if rank else values[:0]
    return _from_spectrum(values, seed).to(dtype)


@st.composite
def near_overflow_matrices(draw, size: int = 8, dtype: torch.dtype = torch.float16, headroom: float = 0.9):
    """Positive semidefinite sums whose largest entry sits at `headroom` × the dtype's max (fp16: 65504):
    one more accumulation step overflows them."""
    seed = draw(_seeds)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * size, size, generator=generator, dtype=torch.float64)
    matrix = x.T @ x
    matrix *= headroom * torch.finfo(dtype).max / matrix.abs().max()
    return matrix.to(dtype)


@st.composite
def asymmetric_matrices(draw, size: int = 8, asymmetry: float | None = None, dtype: torch.dtype = torch.float64):
    """A covariance plus an antisymmetric part, with ‖C−Cᵀ‖/‖C‖ = asymmetry exactly (in float64)."""
    asymmetry = draw(st.floats(min_value=1e-6, max_value=1.0)) if asymmetry is None else asymmetry
    seed = draw(_seeds)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * size, size, generator=generator, dtype=torch.float64)
    covariance = x.T @ x
    a = torch.randn(size, size, generator=generator, dtype=torch.float64)
    antisymmetric = a - a.T
    # ‖(C+tA) − (C+tA)ᵀ‖ = 2t‖A‖ and ‖C+tA‖² = ‖C‖² + t²‖A‖² (C ⟂ A): solve for t.
    c, n = torch.linalg.matrix_norm(covariance), torch.linalg.matrix_norm(antisymmetric)
    t = asymmetry * c / (n * torch.sqrt(torch.tensor(4.0 - asymmetry**2, dtype=torch.float64)))
    return (covariance + t * antisymmetric).to(dtype)
