"""Summaries of score tensors for the report: shape, finite share, statistics and a content digest."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from influence_doctor.checks.scores import finite_fraction
from influence_doctor.findings import json_number


def total_scores(per_module: dict[str, torch.Tensor], keep_tokens: bool = False) -> torch.Tensor:
    """One score per (query, training example), or per training example for self-influence.

    kronfluence stores `all_modules`, or one tensor per module with per-module scores on: they are
    summed. Per-token pairwise scores (`compute_per_token_scores`, shape queries × examples × tokens)
    are summed over tokens too, unless `keep_tokens`: rankings are compared on what an example
    contributes in all. Self-influence is never per token."""
    if "all_modules" in per_module:
        total = per_module["all_modules"]
    else:
        tensors = list(per_module.values())
        total = tensors[0].clone()
        for tensor in tensors[1:]:
            total += tensor
    if keep_tokens or total.ndim <= 2:
        return total
    return total.sum(dim=tuple(range(2, total.ndim)))


def tokens_of(per_module: dict[str, torch.Tensor]) -> int | None:
    """Token positions per example when the pairwise scores are per token, else None."""
    tensor = next(iter(per_module.values()), None)
    return int(tensor.shape[-1]) if tensor is not None and tensor.ndim > 2 else None


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
