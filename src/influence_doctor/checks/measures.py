"""Small pure measurements shared by the checks. Each works in float64 on the tensor's own device,
accepts any tensor (empty, 1×1, NaN, inf, any dtype) and returns plain floats (NaN when undefined)."""

from __future__ import annotations

import math

import torch

from influence_doctor.checks.thresholds import eps

EXACT_FROBENIUS_LIMIT = 1024
"""Above this size, ‖QᵀQ−I‖ and ‖QΛQᵀ−C‖ are estimated with random probes instead of full products."""
PROBES = 16


def as_float64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float64)


def nonfinite_count(tensor: torch.Tensor) -> int:
    if not (tensor.dtype.is_floating_point or tensor.dtype.is_complex):
        return 0
    return int((~torch.isfinite(tensor)).sum().item())


def first_nonfinite_position(tensor: torch.Tensor) -> tuple[int, ...] | None:
    """Index of the first inf/NaN in row-major order, for messages a person can act on."""
    if nonfinite_count(tensor) == 0:
        return None
    flat = int(torch.nonzero(~torch.isfinite(tensor).flatten())[0].item())
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tensor.shape))


def max_abs_finite(tensor: torch.Tensor) -> float:
    values = as_float64(tensor)
    values = values[torch.isfinite(values)]
    return float(values.abs().max().item()) if values.numel() else 0.0


def relative_frobenius(difference: torch.Tensor, reference: torch.Tensor) -> float:
    """‖difference‖_F / ‖reference‖_F; 0 when both vanish, inf when only the reference does."""
    num = float(torch.linalg.vector_norm(as_float64(difference)).item())
    den = float(torch.linalg.vector_norm(as_float64(reference)).item())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def symmetry_error(matrix: torch.Tensor) -> float:
    """‖C−Cᵀ‖_F/‖C‖_F: 0 for a symmetric matrix."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.numel() == 0:
        return math.nan
    c = as_float64(matrix)
    return relative_frobenius(c - c.T, c)


def dead_rows(matrix: torch.Tensor, tolerance_eps: float) -> int:
    """Rows whose largest |entry| is ≤ tolerance_eps·eps·max|C|: units that never carried signal."""
    if matrix.ndim != 2 or matrix.numel() == 0:
        return 0
    c = as_float64(matrix).abs()
    c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
    scale = float(c.max().item())
    limit = tolerance_eps * eps(matrix.dtype) * scale
    return int((c.amax(dim=1) <= limit).sum().item())


def orthogonality_error(vectors: torch.Tensor, seed: int = 0) -> float:
    """‖QᵀQ−I‖_F/√d: how far stored eigenvectors are from orthonormal (estimated above 1024)."""
    if vectors.ndim != 2 or vectors.shape[0] != vectors.shape[1] or vectors.numel() == 0:
        return math.nan
    q = as_float64(vectors)
    d = q.shape[0]
    if d <= EXACT_FROBENIUS_LIMIT:
        error = torch.linalg.matrix_norm(q.T @ q - torch.eye(d, dtype=q.dtype, device=q.device))
        return float(error.item()) / math.sqrt(d)
    probes = _rademacher(d, seed, q.device)
    residual = q.T @ (q @ probes) - probes
    return math.sqrt(float(residual.square().sum().item()) / PROBES) / math.sqrt(d)


def reconstruction_error(vectors: torch.Tensor, values: torch.Tensor, matrix: torch.Tensor, seed: int = 0) -> float:
    """‖QΛQᵀ−C‖_F/‖C‖_F: whether the stored eigenpairs still describe the covariance."""
    if vectors.ndim != 2 or vectors.shape[0] != vectors.shape[1]:
        return math.nan
    if matrix.shape != vectors.shape or values.shape != vectors.shape[:1]:
        return math.nan
    if vectors.numel() == 0:
        return math.nan
    q, lam, c = as_float64(vectors), as_float64(values), as_float64(matrix)
    d = q.shape[0]
    if d <= EXACT_FROBENIUS_LIMIT:
        return relative_frobenius((q * lam) @ q.T - c, c)
    probes = _rademacher(d, seed, q.device)
    residual = (q * lam) @ (q.T @ probes) - c @ probes
    return relative_frobenius(residual, c @ probes)


def rounding_floor(values: torch.Tensor, source: torch.dtype, compute: torch.dtype = torch.float64) -> float:
    """Eigenvalues below this are indistinguishable from rounding: the larger of the storage rounding
    eps(source)·‖λ‖₂ (Weyl's bound for a matrix rounded entrywise) and eigh's own d·eps(compute)·λmax."""
    lam = as_float64(values).flatten()
    lam = lam[torch.isfinite(lam)]
    if lam.numel() == 0:
        return 0.0
    storage = eps(source) * float(torch.linalg.vector_norm(lam).item())
    solver = lam.numel() * eps(compute) * float(lam.abs().max().item())
    return max(storage, solver)


def effective_rank(
    values: torch.Tensor, tolerance_eps: float, dtype: torch.dtype, compute: torch.dtype = torch.float64
) -> int:
    """Eigenvalues above tolerance_eps × the rounding floor: the directions the factor actually resolves."""
    lam = as_float64(values).flatten()
    lam = lam[torch.isfinite(lam)]
    if lam.numel() == 0 or float(lam.max().item()) <= 0.0:
        return 0
    return int((lam > tolerance_eps * rounding_floor(lam, dtype, compute)).sum().item())


def spectrum_extremes(values: torch.Tensor) -> tuple[float, float, float]:
    """(min, max, mean) of the finite entries; NaNs when there are none."""
    lam = as_float64(values).flatten()
    lam = lam[torch.isfinite(lam)]
    if lam.numel() == 0:
        return math.nan, math.nan, math.nan
    return float(lam.min().item()), float(lam.max().item()), float(lam.mean().item())


def damped_condition(smallest: float, largest: float, damping: float) -> float:
    """cond(Λ+δ) = (λmax+δ)/(λmin+δ); inf when the damped spectrum reaches zero or below."""
    if any(math.isnan(x) for x in (smallest, largest, damping)):
        return math.nan
    low, high = smallest + damping, largest + damping
    if low <= 0.0:
        return math.inf
    return high / low


def robust_z_max(values: torch.Tensor) -> float:
    """Largest |x−median|/(1.4826·MAD) over the finite values; NaN when MAD is 0 or undefined."""
    x = as_float64(values).flatten()
    x = x[torch.isfinite(x)]
    if x.numel() < 3:
        return math.nan
    median = x.median()
    mad = (x - median).abs().median()
    if float(mad.item()) == 0.0:
        return math.nan
    return float(((x - median).abs() / (1.4826 * mad)).max().item())


def _rademacher(d: int, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (d, PROBES), generator=generator, dtype=torch.int8)
    return (signs.to(torch.float64) * 2 - 1).to(device)
