"""Summaries of score tensors for the report: shape, finite share, statistics and a content digest."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from influence_doctor.checks.scores import finite_fraction
from influence_doctor.findings import json_number


def digest(tensor: torch.Tensor) -> str:
    """sha256 of the raw bytes, dtype and shape: equal digests mean bit-identical scores."""
    raw = tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    header = f"{tensor.dtype}:{tuple(tensor.shape)}:".encode()
    return "sha256:" + hashlib.sha256(header + raw).hexdigest()


def summarize_scores(scores: torch.Tensor) -> dict[str, Any]:
    finite = scores[torch.isfinite(scores)].double()
    stats: dict[str, Any] = {"min": None, "max": None, "mean": None, "std": None, "median": None}
    if finite.numel():
        stats = {
            "min": json_number(finite.min().item()),
            "max": json_number(finite.max().item()),
            "mean": json_number(finite.mean().item()),
            "std": json_number(finite.std().item()) if finite.numel() > 1 else 0.0,
            "median": json_number(finite.median().item()),
        }
    return {
        "shape": list(scores.shape),
        "dtype": str(scores.dtype).replace("torch.", ""),
        "finite_fraction": finite_fraction(scores),
        "nonfinite": int((~torch.isfinite(scores)).sum().item()),
        **stats,
        "digest": digest(scores),
    }
