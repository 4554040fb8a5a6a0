"""The doctor's own measurement of training: the Task's loss on a fixed sample of training examples,
before and after the user's loop, with two pieces of evidence that tell a broken run from a healthy one.

- The **reference**: the same loss for a freshly initialised copy of the model. A run fine-tuned from a
  converged model starts near zero loss, so "3× its starting loss" can still be nothing; the loss of an
  untrained model of the same architecture is the scale on which "worse" is judged.
- The **uphill cosine**: the cosine between the gradient of the sample loss at the start and the change
  training made to the parameters. Descent moves against the gradient (negative); a sign error (a loss
  maximised, a negated loss) moves along it.

Shared by the runner (the user's model and Task) and by the calibration (generated runs), so the limits
are derived from exactly what the doctor measures. Nothing here touches the user's model's gradients,
mode or random state.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from influence_doctor.checks.train import SampleLoss

BatchLosses = Callable[[nn.Module], Iterable[torch.Tensor]]
"""Yields the Task's summed training loss of each batch of the sample for the given model."""

EVIDENCE_BUDGET_BYTES = 1 << 30
"""Most bytes of parameter copies the evidence may hold: the fresh copy (one, freed once measured), or
the start point and its gradient (two, kept through training). Beyond it only the losses are measured."""
REFERENCE_SEED = 0
"""Seed of the fresh initialisation: the reference is the same on every run of the same model."""


@dataclass
class StartPoint:
    """What was measured before the user's loop."""

    loss: float
    reference: float | None = None
    parameters: dict[str, torch.Tensor] | None = None
    gradient: dict[str, torch.Tensor] | None = None


def _devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


@contextmanager
def _quietly(model: nn.Module) -> Iterator[None]:
    """Eval mode and a forked random state, both restored: the user's loop sees the draws it would
    have seen without the doctor."""
    was_training = model.training
    with torch.random.fork_rng(devices=_devices(model)):
        model.eval()
        try:
            yield
        finally:
            model.train(was_training)


def total_loss(model: nn.Module, batch_losses: BatchLosses) -> float:
    """The summed loss over the sample, in float64, without gradients."""
    with torch.no_grad():
        return sum(float(loss.detach().double().sum().item()) for loss in batch_losses(model))


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _gradient(model: nn.Module, batch_losses: BatchLosses) -> dict[str, torch.Tensor] | None:
    """The gradient of the summed sample loss, accumulated outside the parameters' `.grad`."""
    parameters = _trainable(model)
    if not parameters:
        return None
    names, tensors = list(parameters), list(parameters.values())
    total = [torch.zeros_like(t, dtype=torch.float32, device="cpu") for t in tensors]
    with torch.enable_grad():
        for loss in batch_losses(model):
            grads = torch.autograd.grad(loss.sum(), tensors, allow_unused=True)
            for into, grad in zip(total, grads, strict=True):
                if grad is not None:
                    into += grad.detach().float().cpu()
    return dict(zip(names, total, strict=True))


def fresh_copy(model: nn.Module, seed: int = REFERENCE_SEED) -> nn.Module:
    """A copy of the model initialised afresh: Hugging Face models by their own `_init_weights`, every
    other module by its `reset_parameters` (modules with neither keep their values)."""
    fresh = copy.deepcopy(model)
    init = getattr(fresh, "_init_weights", None)
    with torch.random.fork_rng(devices=_devices(model)), torch.no_grad():
        torch.manual_seed(seed)
        for module in fresh.modules():
            if callable(init):
                init(module)
            elif callable(reset := getattr(module, "reset_parameters", None)):
                reset()
    return fresh


def measure_start(model: nn.Module, batch_losses: BatchLosses, budget_bytes: int = EVIDENCE_BUDGET_BYTES) -> StartPoint:
    """Before training: the sample loss; the loss of a freshly initialised copy when one copy of the
    parameters fits the budget; the gradient there and the parameters themselves when two do."""
    with _quietly(model):
        start = StartPoint(total_loss(model, batch_losses))
        if _bytes(model) > budget_bytes:
            return start
        try:
            start.reference = total_loss(fresh_copy(model), batch_losses)
        except Exception:  # an architecture that cannot be re-initialised: judged on its start alone
            start.reference = None
        if 2 * _bytes(model) > budget_bytes:
            return start
        try:
            start.gradient = _gradient(model, batch_losses)
        except Exception:  # a Task whose loss is not differentiable here: judged without the cosine
            start.gradient = None
        if start.gradient is not None:
            start.parameters = {name: p.detach().float().cpu().clone() for name, p in _trainable(model).items()}
    return start


def uphill_cosine(start: StartPoint, model: nn.Module) -> float | None:
    """cos(gradient at the start, parameters after − before); None without the evidence or movement."""
    if start.gradient is None or start.parameters is None:
        return None
    now = _trainable(model)
    if set(now) != set(start.parameters):
        return None  # the loop replaced the parameters: there is no single path to compare
    dot = gradient_norm = step_norm = 0.0
    with torch.no_grad():
        for name, before in start.parameters.items():
            step = now[name].detach().float().cpu() - before
            grad = start.gradient[name]
            dot += float((grad * step).sum())
            gradient_norm += float((grad * grad).sum())
            step_norm += float((step * step).sum())
    scale = math.sqrt(gradient_norm * step_norm)
    if not math.isfinite(dot) or not scale > 0.0 or not math.isfinite(scale):
        return None
    return max(-1.0, min(1.0, dot / scale))


def measure_end(start: StartPoint, model: nn.Module, batch_losses: BatchLosses, examples: int) -> SampleLoss:
    """After training: the sample loss, beside everything measured at the start."""
    with _quietly(model):
        trained = total_loss(model, batch_losses)
    return SampleLoss(start.loss, trained, examples, start.reference, uphill_cosine(start, model))
