"""What the HTML report draws, reduced from a live run to small arrays: no tensors kept beyond it.

Each configuration the doctor ran (as configured, after each rung) leaves a `Snapshot` with its scores
and, from here, its per-module spectra; the charts compare them, so a person sees the broken run
next to the healed one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

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


def spectra_of(run: Any) -> dict[str, Spectrum]:
    """Per module: the spectrum kronfluence's preconditioner uses, its damping and rounding floor."""
    from influence_doctor.checks.spectra import module_damping, module_spectra, rounding_floors
    from influence_doctor.dtypes import dtype_name

    strategy = run.factor_args.strategy
    try:
        spectra = module_spectra(run.artifacts, strategy)
        dtype = run.score_args.precondition_dtype or torch.float32
        damping = module_damping(run.artifacts, strategy, run.score_args.damping_factor)
        floors = rounding_floors(run.artifacts, strategy, dtype)
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
