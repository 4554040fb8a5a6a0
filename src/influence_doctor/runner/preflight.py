"""Before anything else: each module kronfluence will track, its factor sizes, the memory its
eigendecomposition needs and the time it would take, and the tracked weights tied to another module's,
so that a module that cannot be factored as configured is named before the user's training runs.

It reads the model as built (kronfluence's own rules say which modules it will wrap), or as prepared.

The sizes are exact (from the module's shape and the configured dtypes); the eigendecomposition's
time is a small eigh measured on the device, extrapolated as n³. An LM's output layer over a 50k
vocabulary has a 50257² gradient covariance: 10 GB in float32, 20 GB in float64, as much again for
its eigenvectors — and kronfluence's partitions do not split one module's eigendecomposition.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

REFERENCE_SIZE = 256
"""The eigh measured on the device to extrapolate from (n³): large enough to be timed, a few ms."""


SOLVER_LIMIT = 46_340
"""The largest n whose n×n matrix has fewer than 2³¹ entries: 32-bit LAPACK and cuSOLVER index their
eigh workspaces with 32-bit integers (kronfluence issue #42: CUSOLVER_STATUS_INVALID_VALUE at the last
module), whatever the memory."""


def tracked_modules(model: torch.nn.Module, task: Any = None) -> dict[str, torch.nn.Module]:
    """The modules kronfluence tracks, by name: those it wrapped in a prepared model, or, in a model as
    built, the leaves of a type it supports (exactly: a subclass is not wrapped) that the Task names."""
    from kronfluence.module.tracked_module import TrackedModule

    named = task.get_influence_tracked_modules() if task is not None else None
    wrapped = [name for name, module in model.named_modules() if isinstance(module, TrackedModule)]
    found: dict[str, torch.nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, TrackedModule):
            found[name] = module.original_module
        elif wrapped or any(True for _ in module.children()) or (named is not None and name not in named):
            continue
        elif type(module) in TrackedModule.SUPPORTED_MODULES and name:  # the root has no parent to wrap it in
            found[name] = module
    return found


def unsupported_modules(model: torch.nn.Module, task: Any = None) -> dict[str, str]:
    """Leaves kronfluence's default tracking would try to wrap and cannot, by name → their type: a subclass
    of a supported type (PyTorch's attention `out_proj` is a `NonDynamicallyQuantizableLinear`, on which
    `prepare_model` raises KeyError), or the model itself when it is one supported leaf (kronfluence wraps a
    module in its parent, and the root has none)."""
    from kronfluence.module.tracked_module import TrackedModule

    supported = tuple(TrackedModule.SUPPORTED_MODULES)
    named = task.get_influence_tracked_modules() if task is not None else None
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, TrackedModule) or any(True for _ in module.children()):
            continue
        if named is not None and name not in named:
            continue
        if isinstance(module, supported) and (type(module) not in TrackedModule.SUPPORTED_MODULES or name == ""):
            found[name] = type(module).__name__
    return found


def bare_parameters(model: torch.nn.Module) -> dict[str, list[str]]:
    """Trainable parameters a module holds beside its children (attention's `in_proj_weight`): no leaf
    module owns them, so nothing kronfluence tracks carries their gradient."""
    return {
        name: [key for key, parameter in module.named_parameters(recurse=False) if parameter.requires_grad]
        for name, module in model.named_modules()
        if any(True for _ in module.children()) and any(p.requires_grad for p in module.parameters(recurse=False))
    }


def module_dimensions(model: torch.nn.Module, task: Any = None) -> dict[str, tuple[int, int]]:
    """(activation, gradient) covariance dimensions per tracked module, as kronfluence forms them: the
    input (with a 1 appended for the bias; a convolution's unfolded patch) and the output features."""
    dimensions = {}
    for name, inner in tracked_modules(model, task).items():
        bias = int(getattr(inner, "bias", None) is not None)
        if isinstance(inner, torch.nn.Conv2d):
            kernel = inner.kernel_size[0] * inner.kernel_size[1]
            dimensions[name] = (inner.in_channels // inner.groups * kernel + bias, inner.out_channels)
        elif isinstance(inner, torch.nn.Linear):
            dimensions[name] = (inner.in_features + bias, inner.out_features)
    return dimensions


def tied_weights(model: torch.nn.Module, task: Any = None) -> dict[str, list[str]]:
    """Tracked module → the other modules that hold one of its parameters (GPT-2's `lm_head` and the token
    embedding `transformer.wte`): a gradient kronfluence sees through one of them only."""
    from kronfluence.module.tracked_module import TrackedModule

    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, TrackedModule):
            continue
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(name.removesuffix(".original_module"))
    tied = {}
    for name, module in tracked_modules(model, task).items():
        others = {other for p in module.parameters(recurse=False) for other in owners.get(id(p), []) if other != name}
        if others:
            tied[name] = sorted(others)
    return tied


@functools.cache
def eigh_reference_seconds(dtype: torch.dtype, device: str, size: int = REFERENCE_SIZE) -> float:
    """The fastest of three eighs of a fixed symmetric `size`² matrix in `dtype` on `device`; timed once per
    process (the machine is the same for every pipeline a test suite diagnoses)."""
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


def preflight(
    model: torch.nn.Module, factor_args: Any, device: str, budget_bytes: int | None, task: Any = None
) -> dict[str, Any]:
    """Per tracked module: covariance dimensions, bytes stored, bytes its eigendecomposition works in
    (matrix, eigenvectors and workspace for its larger factor), and the eigendecomposition's projected
    seconds; the solver's limit, and the tracked weights tied to another module. JSON-ready."""
    dimensions = module_dimensions(model, task)
    activation_size = _itemsize(factor_args.activation_covariance_dtype)
    gradient_size = _itemsize(factor_args.gradient_covariance_dtype)
    eigen_dtype = factor_args.eigendecomposition_dtype
    factors = factor_args.strategy in ("kfac", "ekfac")
    reference = eigh_reference_seconds(eigen_dtype, device) if factors and dimensions else None
    modules = {}
    unsupported = unsupported_modules(model, task)
    dimensions = {name: sides for name, sides in dimensions.items() if name not in unsupported}
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
        "solver_limit": SOLVER_LIMIT if factors else None,
        "tied": tied_weights(model, task),
        "unsupported": unsupported,
        "bare_parameters": bare_parameters(model),
    }
