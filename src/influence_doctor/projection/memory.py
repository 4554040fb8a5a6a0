"""Peak memory per stage at full size, and the smallest kronfluence setting that makes a stage fit.

Starts from what the rehearsal measured (each stage's peak: `runner.memory`), because per-batch working
memory — activations, per-sample gradients, preconditioned query gradients — does not grow with the
number of examples: the configured batch sizes fix it. What does grow is added exactly from shapes: the
score matrices kronfluence keeps for every (query, example) pair. Settings that shrink a stage
(smaller batches, iterative Λ aggregation, module partitions, low-rank query gradients) scale the
measured working memory by how much they shrink the tensors that dominate it, from module shapes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

SCORE_STAGES = ("pairwise_scores", "self_scores")
PARTITIONS = (2, 4, 8, 16)
"""Module partitions tried, smallest first."""
LOW_RANKS = (256, 128, 64, 32, 16)
"""`query_gradient_low_rank` values tried, least lossy first."""


@dataclass(frozen=True)
class ModuleShape:
    """One tracked module as kronfluence's factors see it: input width (bias included), output width,
    and positions per example (1 for a Linear on vectors; tokens or spatial positions otherwise)."""

    name: str
    inputs: int
    outputs: int
    positions: float = 1.0

    @property
    def weights(self) -> int:
        return self.inputs * self.outputs


def module_shapes(artifacts: dict[str, Any], examples: int) -> list[ModuleShape]:
    """From the covariance factors (or Λ, for strategies without covariances)."""
    covariance = artifacts.get("covariance") or {}
    shapes = []
    for module, activation in (covariance.get("activation_covariance") or {}).items():
        gradient = covariance["gradient_covariance"][module]
        count = float(covariance["num_activation_covariance_processed"][module].sum())
        shapes.append(ModuleShape(module, int(activation.shape[0]), int(gradient.shape[0]), count / max(examples, 1)))
    if shapes:
        return shapes
    lambdas = artifacts.get("lambda") or {}
    for module, matrix in (lambdas.get("lambda_matrix") or {}).items():
        shapes.append(ModuleShape(module, int(matrix.shape[1]), int(matrix.shape[0])))
    return shapes


def itemsize(dtype: torch.dtype | None) -> int:
    return 4 if dtype is None else torch.empty((), dtype=dtype).element_size()


def working_bytes(stage: str, shapes: list[ModuleShape], settings: Any) -> float:
    """The tensors that dominate a stage's per-batch memory, in bytes (a model, not a measurement:
    only its ratios between settings are used, to scale what was measured). `settings` is a Configuration."""
    if not shapes:
        return 0.0
    fa, sa, batch = settings.factor_args, settings.score_args, settings.batch_size
    if stage == "covariance":
        item = max(itemsize(fa.activation_covariance_dtype), itemsize(fa.gradient_covariance_dtype))
        total = sum(
            batch * s.positions * (s.inputs + s.outputs) * 4 + (s.inputs**2 + s.outputs**2) * item for s in shapes
        )
        return total / fa.covariance_module_partitions
    if stage == "eigendecomposition":
        return max((s.inputs**2 + s.outputs**2) * 8 * 3 for s in shapes)
    if stage == "lambda":
        psg = itemsize(fa.per_sample_gradient_dtype)
        copies = 2 if fa.use_iterative_lambda_aggregation else 3  # per-sample gradient, rotated, rotated again
        largest = max(s.weights for s in shapes)
        modules = sum(
            batch * s.positions * s.inputs * psg
            + s.weights * itemsize(fa.lambda_dtype)
            + (s.inputs**2 + s.outputs**2) * 4
            for s in shapes
        )
        return copies * batch * largest * psg + modules / fa.lambda_module_partitions
    psg = itemsize(sa.per_sample_gradient_dtype)
    largest = max(s.weights for s in shapes)
    per_sample = 4 * batch * largest * psg
    modules = sum(batch * s.positions * s.inputs * psg for s in shapes) / sa.module_partitions
    if stage == "pairwise_scores":
        rank = sa.query_gradient_low_rank
        query = sum(s.weights if rank is None else rank * (s.inputs + s.outputs) for s in shapes)
        modules += settings.query_batch_size * query * itemsize(sa.precondition_dtype) / sa.module_partitions
    return per_sample + modules


def score_bytes(stage: str, queries: int, examples: int, settings: Any, modules: int) -> float:
    """The score matrix kronfluence keeps whole: one entry per (query, example) pair, or per example."""
    if stage not in SCORE_STAGES:
        return 0.0
    sa = settings.score_args
    entries = (queries * examples if stage == "pairwise_scores" else examples) / sa.data_partitions
    return entries * itemsize(sa.score_dtype) * (modules if sa.compute_per_module_scores else 1)


def project_stage(
    stage: str,
    measured: dict[str, Any],
    shapes: list[ModuleShape],
    settings: Any,
    new_settings: Any,
    sizes: tuple[int, int, int, int],
) -> float:
    """Peak bytes of `stage` at full size under `new_settings`, from its peak measured under `settings`.

    `sizes` = (queries, examples) of the rehearsal, then of the full run.
    """
    queries, examples, queries_full, examples_full = sizes
    start, peak = measured["start_bytes"], measured["peak_bytes"]
    modules = len(shapes)
    fixed = score_bytes(stage, queries, examples, settings, modules)
    working = max(peak - start - fixed, 0)
    model = working_bytes(stage, shapes, settings)
    scaled = working * working_bytes(stage, shapes, new_settings) / model if model > 0 else working
    return start + scaled + score_bytes(stage, queries_full, examples_full, new_settings, modules)


def candidates(stage: str, settings: Any, shapes: list[ModuleShape], device: str) -> Iterator[tuple[str, Any]]:
    """kronfluence's documented order of settings to try when a stage runs out of memory, each a little
    stronger than the last (cumulative within a stage): (the setting, the Configuration it makes)."""
    current = settings
    if stage == "covariance":
        batch = current.batch_size
        while batch > 1:
            batch //= 2
            yield f"per_device_batch_size={batch}", _set(current, "batch_size", batch)
        yield from _module_partitions(current, len(shapes), "factor_args", "covariance_module_partitions")
    elif stage == "lambda":
        if not current.factor_args.use_iterative_lambda_aggregation:
            current = _set(current, "factor_args.use_iterative_lambda_aggregation", True)
            yield "use_iterative_lambda_aggregation=True", current
        if device.startswith("cuda") and not current.factor_args.offload_activations_to_cpu:
            current = _set(current, "factor_args.offload_activations_to_cpu", True)
            yield "offload_activations_to_cpu=True", current
        yield from _module_partitions(current, len(shapes), "factor_args", "lambda_module_partitions")
    elif stage in SCORE_STAGES:
        # A rank helps where it is below a module's smaller side: the widest module decides.
        widest = max(min(s.inputs, s.outputs) for s in shapes) if shapes else 0
        if stage == "pairwise_scores" and current.score_args.query_gradient_low_rank is None:
            for rank in LOW_RANKS:
                if rank < widest:
                    yield f"query_gradient_low_rank={rank}", _set(current, "score_args.query_gradient_low_rank", rank)
        yield from _module_partitions(current, len(shapes), "score_args", "module_partitions")
        for parts in PARTITIONS:
            yield f"data_partitions={parts}", _set(current, "score_args.data_partitions", parts)


def _set(configuration: Any, name: str, value: Any) -> Any:
    """One setting changed, through the vocabulary of changes (`set:<name>=<value>`)."""
    from influence_doctor.changes import apply

    return apply(f"set:{name}={value}", configuration)


def advise(
    stage: str,
    measured: dict[str, Any],
    shapes: list[ModuleShape],
    settings: Any,
    sizes: tuple[int, int, int, int],
    budget: float,
    device: str,
) -> dict[str, Any] | None:
    """The first setting, in kronfluence's documented order, that brings the stage under `budget`."""
    for change, trial in candidates(stage, settings, shapes, device):
        projected = project_stage(stage, measured, shapes, settings, trial, sizes)
        if projected <= budget:
            return {"stage": stage, "setting": change, "projected_peak_bytes": projected, "fits": True}
    return {"stage": stage, "setting": None, "projected_peak_bytes": math.nan, "fits": False}


def _module_partitions(current: Any, modules: int, arguments: str, knob: str) -> Iterator[tuple[str, Any]]:
    """`knob` of `current.<arguments>` set to each partition count up to the number of modules."""
    for parts in PARTITIONS:
        if parts > modules:
            break
        yield f"{knob}={parts}", _set(current, f"{arguments}.{knob}", parts)
