"""The doctor's own measurement of training: the Task's loss on a fixed sample of training examples,
before and after the user's loop, with two pieces of evidence that tell a broken run from a healthy one.

- The **reference**: the same loss for a freshly initialised copy of the model. A run fine-tuned from a
  converged model starts near zero loss, so "3× its starting loss" can still be nothing; the loss of an
  untrained model of the same architecture is the scale on which "worse" is judged.
- The **uphill cosine**: the cosine between the gradient of the sample loss at the start and the change
  training made to the parameters. Descent moves against the gradient (negative); a sign error (a loss
  maximised, a negated loss) moves along it.
- The **noise** of both, from the sample's groups (its batches, at least `SAMPLE_GROUPS` of them): the
  standard error of the loss's rise (the spread of the groups' rises), and the gradient's signal-to-noise
  ratio at the start (its squared norm against the squared norm the groups' spread alone would give). Near a
  minimum the gradient is noise and its direction says nothing, and a rise of a few roundings is not a rise.

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


SAMPLE_GROUPS = 16
"""Fewest groups the sample is measured in: enough degrees of freedom (15) for a standard error."""


@dataclass
class StartPoint:
    """What was measured before the user's loop."""

    losses: list[float]
    reference: float | None = None
    parameters: dict[str, torch.Tensor] | None = None
    gradient: dict[str, torch.Tensor] | None = None
    noise: GradientNoise | None = None
    buffers: dict[str, torch.Tensor] | None = None

    @property
    def loss(self) -> float:
        return math.fsum(self.losses)


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


def group_losses(model: nn.Module, batch_losses: BatchLosses) -> list[float]:
    """Each group's summed loss, in float64, without gradients."""
    with torch.no_grad():
        return [float(loss.detach().double().sum().item()) for loss in batch_losses(model)]


def total_loss(model: nn.Module, batch_losses: BatchLosses) -> float:
    """The summed loss over the sample, in float64, without gradients."""
    return math.fsum(group_losses(model, batch_losses))


def rise_standard_error(before: list[float], after: list[float]) -> float | None:
    """The standard error of the total rise Σ(after − before), from the spread of the groups' rises
    (None with fewer than two groups)."""
    if len(before) != len(after) or len(before) < 2:
        return None
    rises = [b - a for a, b in zip(before, after, strict=True)]
    mean = math.fsum(rises) / len(rises)
    variance = math.fsum((r - mean) ** 2 for r in rises) / (len(rises) - 1)
    return math.sqrt(len(rises) * variance)


def gradient_snr(total_squared: float, group_norms: list[float]) -> float | None:
    """‖Σ g_k‖² over the squared norm the groups' spread alone gives that sum (G·s², s² the groups'
    variance; `group_norms` are the ‖g_k‖²): about 1 when the true gradient is zero, large when the
    gradient stands out of its noise."""
    groups = len(group_norms)
    if groups < 2:
        return None
    spread = max(math.fsum(group_norms) - total_squared / groups, 0.0) / (groups - 1)
    noise = groups * spread
    if noise == 0.0:
        return math.inf if total_squared > 0.0 else None
    return total_squared / noise


def noise_dimensions(group_norms: list[float]) -> float | None:
    """The gradient noise's effective number of dimensions, (tr Σ)² / tr(Σ²), as a zero true gradient
    would give it: the groups' ‖g_k‖² then have mean tr Σ and variance 2 tr(Σ²) (Gaussian groups). It
    sets how far the signal-to-noise ratio strays from 1 by chance (None with fewer than two groups)."""
    if len(group_norms) < 2:
        return None
    mean = math.fsum(group_norms) / len(group_norms)
    variance = math.fsum((n - mean) ** 2 for n in group_norms) / (len(group_norms) - 1)
    if variance == 0.0:
        return math.inf if mean > 0.0 else None
    return max(1.0, 2.0 * mean * mean / variance)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@dataclass(frozen=True)
class GradientNoise:
    """The start's gradient against its per-group noise (`gradient_snr`, `noise_dimensions`)."""

    snr: float | None
    dimensions: float | None
    groups: int


def _gradient(model: nn.Module, batch_losses: BatchLosses) -> tuple[dict[str, torch.Tensor], GradientNoise] | None:
    """The gradient of the summed sample loss, accumulated outside the parameters' `.grad`, and its
    signal-to-noise ratio over the groups (`gradient_snr`)."""
    parameters = _trainable(model)
    if not parameters:
        return None
    names, tensors = list(parameters), list(parameters.values())
    total = [torch.zeros_like(t, dtype=torch.float32, device="cpu") for t in tensors]
    group_norms: list[float] = []
    with torch.enable_grad():
        for loss in batch_losses(model):
            grads = torch.autograd.grad(loss.sum(), tensors, allow_unused=True)
            squared = 0.0
            for into, grad in zip(total, grads, strict=True):
                if grad is not None:
                    grad = grad.detach().float().cpu()
                    into += grad
                    squared += float(grad.double().square().sum())
            group_norms.append(squared)
    total_squared = math.fsum(float(t.double().square().sum()) for t in total)
    noise = GradientNoise(gradient_snr(total_squared, group_norms), noise_dimensions(group_norms), len(group_norms))
    return dict(zip(names, total, strict=True)), noise


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
        start = StartPoint(group_losses(model, batch_losses))
        if _bytes(model) > budget_bytes:
            return start
        try:
            start.reference = total_loss(fresh_copy(model), batch_losses)
        except Exception:  # an architecture that cannot be re-initialised: judged on its start alone
            start.reference = None
        if 2 * _bytes(model) > budget_bytes:
            return start
        try:
            measured = _gradient(model, batch_losses)
        except Exception:  # a Task whose loss is not differentiable here: judged without the cosine
            measured = None
        if measured is not None:
            start.gradient, start.noise = measured
        if start.gradient is not None:
            start.parameters = {name: p.detach().float().cpu().clone() for name, p in _trainable(model).items()}
            start.buffers = {name: b.detach().cpu().clone() for name, b in model.named_buffers()}
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


def directional_t(start: StartPoint, model: nn.Module, batch_losses: BatchLosses) -> float | None:
    """The t statistic of the start's gradient along the step training took: each group's directional
    derivative g_k·(θ_after − θ_before) at the start, their sum over its standard error from their spread.
    One dimension, so a t distribution with G − 1 degrees of freedom says whether the gradient points
    anywhere along the step at all (near a minimum it does not). Measured on a copy set back to the start;
    None without the start's parameters, or when a third copy of them does not fit the budget."""
    if start.parameters is None or 3 * _bytes(model) > EVIDENCE_BUDGET_BYTES:
        return None
    now = _trainable(model)
    if set(now) != set(start.parameters):
        return None
    replica = copy.deepcopy(model)
    parameters = _trainable(replica)
    with torch.no_grad():
        for name, p in parameters.items():
            p.copy_(start.parameters[name].to(device=p.device, dtype=p.dtype))
        for name, buffer in replica.named_buffers():
            if start.buffers is not None and name in start.buffers:
                buffer.copy_(start.buffers[name].to(device=buffer.device, dtype=buffer.dtype))
    names, tensors = list(parameters), list(parameters.values())
    step = [(now[name].detach().float().cpu() - start.parameters[name]) for name in names]
    directional: list[float] = []
    with torch.enable_grad():
        for loss in batch_losses(replica):
            grads = torch.autograd.grad(loss.sum(), tensors, allow_unused=True)
            directional.append(
                math.fsum(
                    float((g.detach().float().cpu().double() * d.double()).sum())
                    for g, d in zip(grads, step, strict=True)
                    if g is not None
                )
            )
    spread = rise_standard_error([0.0] * len(directional), directional)
    total = math.fsum(directional)
    if spread is None or not math.isfinite(total):
        return None
    if spread == 0.0:
        return math.inf if total > 0 else (-math.inf if total < 0 else 0.0)
    return total / spread


def measure_end(start: StartPoint, model: nn.Module, batch_losses: BatchLosses, examples: int) -> SampleLoss:
    """After training: the sample loss, beside everything measured at the start."""
    with _quietly(model):
        trained = group_losses(model, batch_losses)
        try:
            along = directional_t(start, model, batch_losses)
        except Exception:  # a model that cannot be copied: judged by the gradient's own signal-to-noise
            along = None
    return SampleLoss(
        start.loss,
        math.fsum(trained),
        examples,
        start.reference,
        uphill_cosine(start, model),
        rise_standard_error=rise_standard_error(start.losses, trained),
        gradient_snr=start.noise.snr if start.noise else None,
        gradient_dimensions=start.noise.dimensions if start.noise else None,
        groups=start.noise.groups if start.noise else len(trained),
        directional_t=along,
    )
