"""Before any factor is fitted: each tracked module's factor sizes, the memory its eigendecomposition
needs and the time it would take, so that a module too large to factor is named before it runs.

The sizes are exact (from the module's shape and the configured dtypes); the eigendecomposition's
time is a small eigh measured on the device, extrapolated as n³. An LM's output layer over a 50k
vocabulary has a 50257² gradient covariance: 10 GB in float32, 20 GB in float64, as much again for
its eigenvectors — and kronfluence's partitions do not split one module's eigendecomposition.
"""

from __future__ import annotations

import time
from typing import Any

import torch

REFERENCE_SIZE = 256
"""The eigh measured on the device to extrapolate from (n³): large enough to be timed, a few ms."""


def module_dimensions(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(activation, gradient) covariance dimensions per tracked module, as kronfluence forms them: the
    input (with a 1 appended for the bias; a convolution's unfolded patch) and the output features."""
    from kronfluence.module.tracked_module import TrackedModule

    dimensions = {}
    for name, module in model.named_modules():
        if not isinstance(module, TrackedModule):
            continue
        inner = module.original_module
        bias = int(getattr(inner, "bias", None) is not None)
        if isinstance(inner, torch.nn.Conv2d):
            kernel = inner.kernel_size[0] * inner.kernel_size[1]
            dimensions[name] = (inner.in_channels // inner.groups * kernel + bias, inner.out_channels)
        elif isinstance(inner, torch.nn.Linear):
            dimensions[name] = (inner.in_features + bias, inner.out_features)
    return dimensions


def eigh_reference_seconds(dtype: torch.dtype, device: str, size: int = REFERENCE_SIZE) -> float:
    """The fastest of three eighs of a fixed symmetric `size`² matrix in `dtype` on `device`."""
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(size, size, generator=generator, dtype=torch.float64)
    matrix = (matrix @ matrix.T).to(dtype=dtype, device=device)
    best = float("inf")
    for _ in range(3):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        torch.linalg.eigh(matrix)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def preflight(model: torch.nn.Module, factor_args: Any, device: str, budget_bytes: int | None) -> dict[str, Any]:
    """Per tracked module: covariance dimensions, bytes stored, bytes its eigendecomposition works in
    (matrix, eigenvectors and workspace for its larger factor), and the eigendecomposition's projected
    seconds. JSON-ready."""
    dimensions = module_dimensions(model)
    activation_size = _itemsize(factor_args.activation_covariance_dtype)
    gradient_size = _itemsize(factor_args.gradient_covariance_dtype)
    eigen_dtype = factor_args.eigendecomposition_dtype
    factors = factor_args.strategy in ("kfac", "ekfac")
    reference = eigh_reference_seconds(eigen_dtype, device) if factors and dimensions else None
    modules = {}
    for name, (a, g) in dimensions.items():
        largest = max(a, g)
        entry: dict[str, Any] = {
            "activation": a,
            "gradient": g,
            "covariance_bytes": a * a * activation_size + g * g * gradient_size,
        }
        if factors:
            # eigh copies the matrix, returns n² eigenvectors and needs about 2n² of workspace (syevd)
            entry["eigendecomposition_bytes"] = 4 * largest * largest * _itemsize(eigen_dtype)
            entry["eigendecomposition_seconds"] = reference * (largest / REFERENCE_SIZE) ** 3 if reference else 0.0
        modules[name] = entry
    return {
        "modules": modules,
        "budget_bytes": budget_bytes,
        "eigendecomposition_dtype": str(eigen_dtype).replace("torch.", ""),
        "eigh_reference": {"size": REFERENCE_SIZE, "seconds": reference} if reference is not None else None,
    }
