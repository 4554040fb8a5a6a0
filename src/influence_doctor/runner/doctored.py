"""Doctored covariances: a diagonal shift written to a NEW factors folder, never over the original.

kronfluence stores covariances as sums with separate example counts, so shifting the sum by
ε·mean(diag Σ) is the same relative shift as ε·mean(diag C) of the normalised matrix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from influence_doctor.atomic import write_tensors_atomic, write_text_atomic

COVARIANCE_FACTORS = ("activation_covariance", "gradient_covariance")
COUNT_FACTORS = ("num_activation_covariance_processed", "num_gradient_covariance_processed")


def shifted(covariance_sum: torch.Tensor, mode: str, epsilon: float) -> torch.Tensor:
    """(C+Cᵀ)/2 + shift·I in float64, back in the stored dtype; shift = ε·mean(diag) or ε·trace."""
    c = covariance_sum.detach().to(torch.float64)
    c = 0.5 * (c + c.T)
    diagonal = torch.diagonal(c)
    amount = epsilon * (diagonal.sum() if mode == "trace" else diagonal.mean())
    c = c + amount * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    return c.to(covariance_sum.dtype).contiguous()


def doctor_covariances(covariance: dict[str, Any], mode: str, epsilon: float) -> dict[str, Any]:
    """A shifted copy of kronfluence's covariance dictionary; counts are kept as they were."""
    doctored: dict[str, Any] = {name: dict(covariance[name]) for name in COUNT_FACTORS}
    for name in COVARIANCE_FACTORS:
        doctored[name] = {module: shifted(matrix, mode, epsilon) for module, matrix in covariance[name].items()}
    return doctored


def write_factors(directory: Path, factors: dict[str, dict[str, torch.Tensor]], factor_args: Any) -> None:
    """Write covariance files the way kronfluence names them, each atomically, plus the arguments."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, per_module in factors.items():
        tensors = {module: tensor.detach().cpu().contiguous() for module, tensor in per_module.items()}
        write_tensors_atomic(directory / f"{name}.safetensors", tensors)
    write_text_atomic(directory / "factor_arguments.json", json.dumps(factor_args.to_dict(), indent=4) + "\n")
