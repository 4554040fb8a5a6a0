"""The spectrum each module's preconditioner divides by, and what kronfluence's damping does to it.

kronfluence forms (Λ + δ)⁻¹ per module: EK-FAC and diagonal divide by Λ/n, K-FAC by the Kronecker product
of the two factors' eigenvalues; δ is the configured `damping_factor`, or 0.1 × the mean of each module's
spectrum when it is None. A damping below eps(precondition dtype)·λmax vanishes when added to the largest
eigenvalue: the rounding floor. Pure: kronfluence's loaded dictionaries in, numbers out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

HEURISTIC_DAMPING_SCALE = 0.1
"""kronfluence's damping when `damping_factor=None`: 0.1 × the mean of the spectrum."""


def effective_damping(damping_factor: float | None, mean: float) -> float:
    """The δ kronfluence will add: the configured factor, or its heuristic."""
    return HEURISTIC_DAMPING_SCALE * mean if damping_factor is None else float(damping_factor)


def module_spectra(artifacts: Mapping[str, Any], strategy: str) -> dict[str, torch.Tensor]:
    """The spectrum each module's preconditioner divides by before damping, as kronfluence forms it:
    EK-FAC and diagonal Λ/n, K-FAC the Kronecker product of the two eigenvalue vectors."""
    spectra: dict[str, torch.Tensor] = {}
    lambdas = artifacts.get("lambda") or {}
    if strategy in ("ekfac", "diagonal") and lambdas:
        for module, matrix in lambdas.get("lambda_matrix", {}).items():
            count = float(lambdas["num_lambda_processed"][module].sum())
            spectra[module] = matrix.detach().double().cpu() / max(count, 1.0)
    eigen = artifacts.get("eigendecomposition") or {}
    if strategy == "kfac" and eigen:
        for module, activation in eigen.get("activation_eigenvalues", {}).items():
            gradient = eigen["gradient_eigenvalues"][module]
            spectra[module] = torch.outer(gradient.detach().double().cpu(), activation.detach().double().cpu())
    return spectra


def module_damping(artifacts: Mapping[str, Any], strategy: str, damping_factor: float | None) -> dict[str, float]:
    """The damping kronfluence adds to each module: the explicit value, or 0.1 × the mean of its spectrum."""
    spectra = module_spectra(artifacts, strategy)
    if damping_factor is not None:
        return {module: float(damping_factor) for module in spectra}
    return {module: HEURISTIC_DAMPING_SCALE * float(spectrum.mean()) for module, spectrum in spectra.items()}


def rounding_floors(artifacts: Mapping[str, Any], strategy: str, dtype: torch.dtype) -> dict[str, float]:
    """eps(dtype)·λmax per module: a damping below it vanishes when added to the largest eigenvalue."""
    unit = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps
    floors = {}
    for module, spectrum in module_spectra(artifacts, strategy).items():
        finite = spectrum[torch.isfinite(spectrum)]
        floors[module] = unit * float(finite.abs().max()) if finite.numel() else math.nan
    return floors


def scaled_damping(
    artifacts: Mapping[str, Any],
    strategy: str,
    damping_factor: float | None,
    factor: float,
    dtype: torch.dtype,
    from_floor: bool = True,
) -> dict[str, float]:
    """Each module's own damping × `factor`. With `from_floor`, taken from at least the module's rounding
    floor eps·λmax (a damping below rounding damps nothing, and ten times nothing is still nothing: the
    experiment that asks whether damping lifts a failure needs that); without it, only a damping of
    exactly 0 starts from the floor, so an explicit damping stays one value for every module."""
    damping = module_damping(artifacts, strategy, damping_factor)
    floors = {m: v if math.isfinite(v) else 0.0 for m, v in rounding_floors(artifacts, strategy, dtype).items()}
    return {
        module: factor * (max(value, floors.get(module, 0.0)) if from_floor or value == 0.0 else value)
        for module, value in damping.items()
    }


def damping_reference_points(artifacts: dict[str, Any], strategy: str, precondition_dtype: torch.dtype):
    """(largest heuristic damping over modules, largest rounding floor over modules): kronfluence takes
    one damping for every module, so a rung must be enough for the module that needs the most."""
    heuristic = [v for v in module_damping(artifacts, strategy, None).values() if math.isfinite(v)]
    floors = [v for v in rounding_floors(artifacts, strategy, precondition_dtype).values() if math.isfinite(v)]
    return (max(heuristic) if heuristic else None), (max(floors) if floors else None)


# --- what the report draws ---------------------------------------------------------------------------

MAX_SPECTRUM_POINTS = 400
"""Eigenvalues kept per module for drawing: evenly spaced ranks, both ends always kept."""


@dataclass(frozen=True)
class Spectrum:
    """One module's spectrum as its preconditioner divides by it, with what the damping adds and the
    smallest value the precondition dtype can still add to its largest (eps·λmax)."""

    eigenvalues: list[float]  # descending, at most MAX_SPECTRUM_POINTS
    count: int  # eigenvalues in the module before thinning
    damping: float
    floor: float
    dtype: str

    @property
    def condition(self) -> float:
        finite = [v for v in self.eigenvalues if math.isfinite(v)]
        if not finite or max(finite) <= 0:
            return math.inf
        return max(finite) / max(min(finite) + self.damping, 1e-300)


def spectra_of(
    artifacts: Mapping[str, Any], strategy: str, damping_factor: float | None, precondition_dtype: Any
) -> dict[str, Spectrum]:
    """Per module: the spectrum kronfluence's preconditioner uses, its damping and rounding floor, thinned
    for drawing."""
    from influence_doctor.dtypes import dtype_name

    try:
        spectra = module_spectra(artifacts, strategy)
        dtype = precondition_dtype or torch.float32
        damping = module_damping(artifacts, strategy, damping_factor)
        floors = rounding_floors(artifacts, strategy, dtype)
    except Exception:  # a stage that did not complete leaves nothing to draw, never an error
        return {}
    out = {}
    for module, spectrum in spectra.items():
        values = spectrum.flatten().double()
        values = torch.sort(torch.nan_to_num(values, nan=-math.inf), descending=True).values
        count = values.numel()
        if count > MAX_SPECTRUM_POINTS:
            index = torch.linspace(0, count - 1, MAX_SPECTRUM_POINTS).round().long()
            values = values[index]
        out[module] = Spectrum(
            values.tolist(),
            count,
            float(damping.get(module, math.nan)),
            floors.get(module, math.nan),
            dtype_name(dtype),
        )
    return out
