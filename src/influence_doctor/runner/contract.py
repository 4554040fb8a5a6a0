"""The Task's contract with kronfluence, measured before any factor is fitted.

kronfluence reads per-example gradients out of the gradient of one batch's loss, so the Task's loss
and measurement of a batch must be the sum of what each example gives alone: a batch mean scales
every example by 1/B (and a partial last batch differently from the rest), a normalisation over the
batch or a loss across examples mixes them. This module runs the Task on a few small batches and on
each of their examples alone, in float64 where the model can be copied cheaply, and records the
numbers; `checks/contract.py` judges them. It also runs each analysed example alone, to name those
whose loss is inf/NaN: kronfluence silently scores them 0.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

CONTRACT_EXAMPLES = 4
"""Training (and query) examples the contract is measured on: batches of 2 and of 4 tell a mean (1/B
at both sizes) from a sum (1) and from anything else."""
FLOAT64_COPY_BYTES = 1 << 30
"""Largest float64 copy of the model the contract is measured on; a larger model is measured as it is."""
ALONE_EXAMPLES = 256
"""Analysed training examples (and queries) whose loss is computed alone, to name the non-finite ones."""


def measure_contract(
    task: Any, model: torch.nn.Module, train: Any, queries: Any, collate: Callable[[list[Any]], Any], device: str
) -> dict[str, Any]:
    """Loss (with its gradient) and measurement on batches of 2 and 4 against the sum over the same
    examples alone; a JSON-ready record, or {"error": ...} when the Task cannot be run this way."""
    try:
        subject, dtype = _subject_model(model)
        returned: set[torch.dtype] = set()  # a Task may compute in float32 on a float64 model (`logits.float()`)
        record: dict[str, Any] = {"dtype": str(dtype).replace("torch.", ""), "probes": []}
        parameters = [p for p in subject.parameters() if p.requires_grad] or list(subject.parameters())
        for name, dataset, quantity in (
            ("train loss", train, lambda batch: task.compute_train_loss(batch, subject, sample=False)),
            ("measurement", queries, lambda batch: task.compute_measurement(batch, subject)),
        ):
            examples = [dataset[index] for index in range(min(CONTRACT_EXAMPLES, len(dataset)))]
            for size in (2, CONTRACT_EXAMPLES):
                if len(examples) < size:
                    continue
                chosen = examples[:size]
                batch = _prepared(collate(chosen), dtype, device)
                alone = [_prepared(collate([example]), dtype, device) for example in chosen]
                probe = _compare(quantity, batch, alone, parameters if name == "train loss" else None, returned)
                record["probes"].append({"quantity": name, "batch": size, **probe})
        coarsest = max((torch.finfo(d).eps, str(d)) for d in {dtype, *returned} if d.is_floating_point)
        record["dtype"] = coarsest[1].replace("torch.", "")  # the tolerance follows the coarsest computation
        if subject is not model:
            del subject
        return record
    except Exception as exc:  # a Task that cannot run on these batches is the run's problem, said elsewhere
        text = str(exc).strip().splitlines()
        return {"error": f"{type(exc).__name__}: {text[0] if text else ''}"}


def _subject_model(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.dtype]:
    """A float64 copy in eval mode with gradients on, when it fits; else the model itself."""
    floating = [p for p in model.parameters() if p.dtype.is_floating_point]
    dtype = floating[0].dtype if floating else torch.float32
    if sum(p.numel() for p in floating) * 8 <= FLOAT64_COPY_BYTES:
        subject = copy.deepcopy(model).double().eval()
        for parameter in subject.parameters():
            parameter.requires_grad_(True)
        return subject, torch.float64
    return model, dtype


def _prepared(batch: Any, dtype: torch.dtype, device: str) -> Any:
    """The batch on the device, its floating tensors in the subject's dtype."""
    from accelerate.utils import send_to_device

    return _map_tensors(send_to_device(batch, torch.device(device)), dtype)


def _map_tensors(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.dtype.is_floating_point else value
    if isinstance(value, Mapping):
        return type(value)({key: _map_tensors(inner, dtype) for key, inner in value.items()})  # type: ignore[call-arg]
    if isinstance(value, tuple | list):
        return type(value)(_map_tensors(inner, dtype) for inner in value)
    return value


def _compare(
    quantity: Callable[[Any], torch.Tensor],
    batch: Any,
    alone: Sequence[Any],
    parameters: list[torch.Tensor] | None,
    returned: set[torch.dtype],
) -> dict[str, Any]:
    """The batch's value against the sum of the examples' values alone; with `parameters`, the same for
    the gradient (relative distance of the batch's gradient from the sum of the examples')."""
    batch_value, batch_gradient = _evaluate(quantity, batch, parameters, returned)
    alone_values, alone_gradient = [], None
    for example in alone:
        try:
            value, gradient = _evaluate(quantity, example, parameters, returned)
        except Exception as exc:  # the batch ran, an example alone does not: it needs its batch
            text = str(exc).strip().splitlines()
            return {"batch_value": batch_value, "alone_error": f"{type(exc).__name__}: {text[0] if text else ''}"}
        alone_values.append(value)
        if gradient is not None:
            alone_gradient = gradient if alone_gradient is None else alone_gradient + gradient
    result: dict[str, Any] = {"batch_value": batch_value, "alone_values": alone_values, "alone_sum": sum(alone_values)}
    if batch_gradient is not None and alone_gradient is not None:
        norm = float(alone_gradient.norm())
        result["gradient_difference"] = float((batch_gradient - alone_gradient).norm()) / norm if norm else math.nan
        scale = float(batch_gradient @ alone_gradient) / norm**2 if norm else math.nan
        result["gradient_scale"] = scale  # the batch's gradient along the sum's, as a multiple of it
        scaled = scale * norm
        residual = float((batch_gradient - scale * alone_gradient).norm())
        result["gradient_residual"] = residual / abs(scaled) if scaled else math.nan  # what no scale explains
    return result


def _evaluate(
    quantity: Callable[[Any], torch.Tensor],
    batch: Any,
    parameters: list[torch.Tensor] | None,
    returned: set[torch.dtype],
) -> tuple[float, torch.Tensor | None]:
    """The quantity's value on the batch (and its gradient, with `parameters`); notes the dtype it came in."""
    if parameters is None:
        with torch.no_grad():
            value = quantity(batch)
            returned.add(value.dtype)
            return float(value.detach().double().sum()), None
    value = quantity(batch)
    returned.add(value.dtype)
    gradients = torch.autograd.grad(value.sum(), parameters, allow_unused=True)
    flat = torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).detach().double().flatten()
            for g, p in zip(gradients, parameters, strict=True)
        ]
    )
    return float(value.detach().double().sum()), flat


def nonfinite_examples(
    task: Any,
    model: torch.nn.Module,
    dataset: Any,
    indices: Sequence[int],
    collate: Callable[[list[Any]], Any],
    device: str,
    measurement: bool = False,
) -> dict[str, Any]:
    """Each of the first `ALONE_EXAMPLES` examples of `dataset` alone: the positions (`indices` maps them to
    the user's data set) whose loss — or measurement, for queries — is inf/NaN."""
    from accelerate.utils import send_to_device

    checked = min(len(dataset), ALONE_EXAMPLES)
    bad: list[int] = []
    try:
        with torch.no_grad():
            for position in range(checked):
                batch = send_to_device(collate([dataset[position]]), torch.device(device))
                value = (
                    task.compute_measurement(batch, model)
                    if measurement
                    else task.compute_train_loss(batch, model, sample=False)
                )
                if not bool(torch.isfinite(value.detach()).all()):
                    bad.append(int(indices[position]) if position < len(indices) else position)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        return {"checked": checked, "error": f"{type(exc).__name__}: {text[0] if text else ''}"}
    return {"checked": checked, "total": len(dataset), "nonfinite": bad}


def batch_size_of(batch: Any) -> int:
    """Examples in a collated batch: the first dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, tuple | list) else ()
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim:
            return int(value.shape[0])
        if isinstance(value, Mapping | tuple | list):
            return batch_size_of(value)
    raise ValueError("no tensor in the batch to count its examples by")


def summed_task(task: Any) -> Any:
    """The user's Task with each batch's loss and measurement multiplied by the batch's size: exact for a
    batch mean, which it makes the sum over examples kronfluence needs (the `task:sum` rung)."""
    return wrapped_task(task, summed=True)


def wrapped_task(task: Any, summed: bool = False, tracked: tuple[str, ...] | None = None) -> Any:
    """The user's Task as a configuration hands it to kronfluence: with each batch's loss and measurement
    multiplied by the batch's size (`summed`), naming the modules to track (`tracked`), and drawing the
    true Fisher's sampled targets per example from the stage's seed (`runner.sampling`)."""
    from kronfluence.task import Task

    from influence_doctor.runner.sampling import sampled_batch

    class ConfiguredTask(Task):
        enable_post_process_per_sample_gradient = getattr(task, "enable_post_process_per_sample_gradient", False)

        def compute_train_loss(self, batch: Any, model: torch.nn.Module, sample: bool = False) -> torch.Tensor:
            if sample:
                with sampled_batch(batch_size_of(batch)):
                    loss = task.compute_train_loss(batch, model, sample)
            else:
                loss = task.compute_train_loss(batch, model, sample)
            return loss * batch_size_of(batch) if summed else loss

        def compute_measurement(self, batch: Any, model: torch.nn.Module) -> torch.Tensor:
            measurement = task.compute_measurement(batch, model)
            return measurement * batch_size_of(batch) if summed else measurement

        def get_influence_tracked_modules(self) -> Any:
            return list(tracked) if tracked is not None else task.get_influence_tracked_modules()

        def get_attention_mask(self, batch: Any) -> Any:
            return task.get_attention_mask(batch)

        def post_process_per_sample_gradient(self, module_name: str, gradient: torch.Tensor) -> torch.Tensor:
            return task.post_process_per_sample_gradient(module_name, gradient)

    wrapped = ConfiguredTask()
    wrapped.user_task = task  # type: ignore[attr-defined]
    return wrapped
