"""Pre-flight sizes (`runner/preflight.py`), judged: a module too large to factor, or beyond the
eigensolver's 32-bit limit, is named before the user's training runs, with the fix; a tracked weight tied
to another module is named too."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from influence_doctor.causes import OUT_OF_MEMORY, SHARED_PARAMETERS
from influence_doctor.checks.outcome import CheckOutcome
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.findings import fail, warn

FIX = (
    "leave it out of the tracked modules (Task.get_influence_tracked_modules; an LM's output layer over its "
    "vocabulary is the usual one), or use a smaller eigendecomposition_dtype; kronfluence's partitions do not "
    "split one module's eigendecomposition"
)


def _gb(value: float) -> str:
    return f"{value / 2**30:.3g} GiB"


def peak_bytes(record: Mapping[str, Any], module: str) -> int:
    """What is held while `module` is eigendecomposed: every module's covariances and its working set."""
    modules = record["modules"]
    stored = sum(entry["covariance_bytes"] for entry in modules.values())
    return stored + modules[module].get("eigendecomposition_bytes", 0)


def certain_bytes(record: Mapping[str, Any], module: str) -> int:
    """The part of `peak_bytes` that is counted, not estimated: every module's covariances, the matrix eigh
    works on and its eigenvectors (half the working set; the other half is LAPACK's workspace, estimated)."""
    return peak_bytes(record, module) - record["modules"][module].get("eigendecomposition_bytes", 0) // 2


def over_budget(record: Mapping[str, Any]) -> list[str]:
    """Modules whose eigendecomposition cannot fit the memory budget on counted bytes alone."""
    budget = record.get("budget_bytes")
    if not budget:
        return []
    return [module for module in record.get("modules", {}) if certain_bytes(record, module) > budget]


def beyond_solver(record: Mapping[str, Any]) -> list[str]:
    """Modules whose larger covariance has more than 2³¹ entries: no 32-bit eigensolver can take it."""
    limit = record.get("solver_limit")
    if not limit:
        return []
    return [module for module, entry in record.get("modules", {}).items() if _side(entry) > limit]


def blocked(record: Mapping[str, Any]) -> list[str]:
    """Modules that cannot be factored as configured: over the memory budget, or beyond the solver."""
    found = over_budget(record)
    return found + [module for module in beyond_solver(record) if module not in found]


def near_budget(record: Mapping[str, Any]) -> list[str]:
    """Modules that fit on counted bytes but not once the estimated workspace is added: a projection."""
    budget = record.get("budget_bytes")
    if not budget:
        return []
    return [m for m in record.get("modules", {}) if certain_bytes(record, m) <= budget < peak_bytes(record, m)]


def _side(entry: Mapping[str, Any]) -> int:
    """The larger covariance dimension of a module: the one its eigendecomposition is sized by."""
    return max(entry["activation"], entry["gradient"])


def check_module_sizes(record: Mapping[str, Any], thresholds: Thresholds) -> CheckOutcome:
    """`preflight.memory` (fail when the counted bytes alone exceed the budget, the device's memory; warn
    when only the estimated workspace tips it over) and `preflight.eigendecomposition_time` (warn: the
    time is extrapolated from a measured small eigh)."""
    outcome = CheckOutcome()
    modules = record.get("modules") or {}
    if not modules:
        return outcome
    dtype = record.get("eigendecomposition_dtype", "float64")
    largest = max(modules, key=lambda m: _side(modules[m]))
    sizes = {key: value for key, value in modules[largest].items() if not key.endswith("seconds")}  # no timings:
    outcome.metrics["largest_module"] = {"module": largest, **sizes}  # ranks compare these numbers
    budget = record.get("budget_bytes")
    for module in over_budget(record):
        side, peak = _side(modules[module]), peak_bytes(record, module)
        working = modules[module]["eigendecomposition_bytes"]
        outcome.findings.append(
            fail(
                "preflight.memory",
                f"{module} has a {side}×{side} covariance: its eigendecomposition in {dtype} needs {_gb(working)} "
                f"(matrix, eigenvectors, workspace) beside {_gb(peak - working)} of covariances, over the "
                f"{_gb(budget)} budget; nothing was fitted. Fix: {FIX}.",
                subject=module,
                value=float(peak),
                limit=float(budget),
                cause=OUT_OF_MEMORY,
                stage="train",
            )
        )
    for module in near_budget(record):
        side, peak = _side(modules[module]), peak_bytes(record, module)
        outcome.findings.append(
            warn(
                "preflight.memory",
                f"{module} has a {side}×{side} covariance: with an estimated eigh workspace its eigendecomposition "
                f"in {dtype} would need {_gb(peak)}, over the {_gb(budget)} budget (projected, not measured; the "
                f"counted bytes fit). Fix if it fails: {FIX}.",
                subject=module,
                value=float(peak),
                limit=float(budget),
                cause=OUT_OF_MEMORY,
                stage="train",
            )
        )
    limit = record.get("solver_limit")
    for module in beyond_solver(record):
        side = _side(modules[module])
        outcome.findings.append(
            fail(
                "preflight.solver_limit",
                f"{module} has a {side}×{side} covariance, {side * side:,} entries: more than 2³¹, which the "
                f"32-bit LAPACK and cuSOLVER eigensolvers cannot index (kronfluence issue #42: "
                f"CUSOLVER_STATUS_INVALID_VALUE), whatever the memory; nothing was fitted. Fix: {FIX}.",
                subject=module,
                value=float(side),
                limit=float(limit),
                cause=OUT_OF_MEMORY,
                stage="train",
            )
        )
    for module, others in (record.get("tied") or {}).items():
        outcome.findings.append(
            warn(
                "preflight.tied_weights",
                f"{module}'s weight is tied to {', '.join(others)}: kronfluence tracks it through {module} alone, "
                "so the gradient the other use adds is invisible to its factors and scores.",
                subject=module,
                value=float(len(others)),
                limit=0.0,
                cause=SHARED_PARAMETERS,
                stage="train",
            )
        )
    slow = [
        m
        for m, e in modules.items()
        if e.get("eigendecomposition_seconds", 0.0) > thresholds.preflight.preflight_eigh_seconds
    ]
    for module in slow:
        if module in blocked(record):
            continue
        seconds = modules[module]["eigendecomposition_seconds"]
        side = _side(modules[module])
        outcome.findings.append(
            warn(
                "preflight.eigendecomposition_time",
                f"{module} has a {side}×{side} covariance: its eigendecomposition alone is projected at "
                f"~{seconds:.3g} s (a measured {record['eigh_reference']['size']}² eigh × (n/"
                f"{record['eigh_reference']['size']})³; not measured at this size). Fix: {FIX}.",
                subject=module,
                value=seconds,
                limit=thresholds.preflight.preflight_eigh_seconds,
                cause=OUT_OF_MEMORY,
                stage="train",
            )
        )
    return outcome
