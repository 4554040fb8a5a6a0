"""Generated healthy cases on which the training and score heuristics are calibrated (SPEC 4.1).

A heuristic threshold is only as good as its false-alarm rate on runs that are known to be fine. The
cases here are real: tiny torch models really trained on synthetic data (loss curves) and small
pipelines really run through kronfluence under the doctor (score matrices), varied on purpose in
everything a user varies (model, data noise, batch size, optimizer, learning rate, run length, seed,
damping). None of the project's fixtures is among them, so no threshold can be tuned to one.
"""

from __future__ import annotations

import math
import random
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from influence_doctor.checks.scores import check_module_dominance, check_query_scale, check_scores
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.checks.train import check_loss_curve
from influence_doctor.findings import Finding

BATCH_SIZES: tuple[int | None, ...] = (1, 2, 8, 32, None)
"""Minibatch sizes the curves cycle through; None is full batch."""
OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "adam")
TASKS: tuple[str, ...] = ("regression", "classification")


@dataclass(frozen=True)
class TrainingRecipe:
    """Everything that decides one healthy training run."""

    task: str
    optimizer: str
    learning_rate: float
    batch_size: int | None
    steps: int
    examples: int
    features: int
    hidden: tuple[int, ...]
    activation: str
    noise: float
    classes: int
    seed: int

    @property
    def name(self) -> str:
        batch = "full" if self.batch_size is None else str(self.batch_size)
        layers = "x".join(map(str, self.hidden)) or "linear"
        return (
            f"{self.task} {layers} {self.activation} {self.optimizer} lr={self.learning_rate:.2g} batch={batch} "
            f"steps={self.steps} noise={self.noise:.2g} seed={self.seed}"
        )


@dataclass(frozen=True)
class HealthyCurve:
    """The per-step training loss of one healthy run, with validation loss where it was measured."""

    name: str
    loss: list[float]
    validation_loss: list[float | None]


@dataclass(frozen=True)
class HealthyScores:
    """Per-module pairwise and self scores of one healthy pipeline, as kronfluence stored them."""

    name: str
    pairwise: dict[str, torch.Tensor]
    self_scores: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class AlarmRates:
    """How many healthy cases raised each check, per severity: every one of them is a false alarm."""

    cases: int = 0
    fail: Counter[str] = field(default_factory=Counter)
    warn: Counter[str] = field(default_factory=Counter)
    any_fail: int = 0
    any_warn: int = 0

    def add(self, findings: Iterable[Finding]) -> None:
        """Count one case: each check at most once per severity, so rates are shares of cases."""
        findings = list(findings)
        self.cases += 1
        fails = {finding.check for finding in findings if finding.severity == "fail"}
        warns = {finding.check for finding in findings if finding.severity == "warn"}
        self.fail.update(fails)
        self.warn.update(warns)
        self.any_fail += bool(fails)
        self.any_warn += bool(warns)

    def rate(self, severity: str, check: str | None = None) -> float:
        """Share of cases with a finding of `severity` for `check` (any check when None)."""
        if not self.cases:
            return 0.0
        counts = self.fail if severity == "fail" else self.warn
        total = (self.any_fail if severity == "fail" else self.any_warn) if check is None else counts[check]
        return total / self.cases


# --- healthy training curves ---------------------------------------------------------------------------


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def draw_recipe(index: int, rng: random.Random) -> TrainingRecipe:
    """One healthy recipe; the batch size, optimizer and task cycle so every combination is covered.

    Learning rates are the ranges a practitioner would pick for standardised inputs; plain SGD gets a
    smaller step on single examples, where the per-example curvature is highest.
    """
    batch_size = BATCH_SIZES[index % len(BATCH_SIZES)]
    optimizer = OPTIMIZERS[(index // len(BATCH_SIZES)) % len(OPTIMIZERS)]
    task = TASKS[(index // (len(BATCH_SIZES) * len(OPTIMIZERS))) % len(TASKS)]
    if optimizer == "adam":
        learning_rate = _log_uniform(rng, 1e-3, 1e-2)
    else:
        learning_rate = _log_uniform(rng, 0.005, 0.05) if task == "regression" else _log_uniform(rng, 0.02, 0.3)
        learning_rate *= min(1.0, math.sqrt((batch_size or 32) / 8))  # single examples: steeper, noisier steps
        if optimizer == "momentum":
            learning_rate /= 10.0  # momentum 0.9 multiplies the effective step by 10
    depth = rng.choice((0, 1, 1, 2))
    return TrainingRecipe(
        task=task,
        optimizer=optimizer,
        learning_rate=learning_rate,
        batch_size=batch_size,
        steps=round(_log_uniform(rng, 20, 300)),
        examples=rng.choice((64, 128, 256, 512)),
        features=rng.choice((4, 8, 16)),
        hidden=tuple(rng.choice((8, 16, 32, 64)) for _ in range(depth)),
        activation=rng.choice(("tanh", "relu")),
        noise=_log_uniform(rng, 0.01, 0.5) if task == "regression" else rng.uniform(0.0, 0.2),
        classes=rng.choice((2, 3, 5)),
        seed=rng.randrange(2**31),
    )


def _network(recipe: TrainingRecipe, outputs: int) -> nn.Module:
    activation = {"tanh": nn.Tanh, "relu": nn.ReLU}[recipe.activation]
    layers: list[nn.Module] = []
    width = recipe.features
    for hidden in recipe.hidden:
        layers += [nn.Linear(width, hidden), activation()]
        width = hidden
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


def synthetic_task(recipe: TrainingRecipe, generator: torch.Generator) -> tuple[TensorDataset, TensorDataset, int]:
    """Train and validation sets from a random teacher network, with target noise (regression) or
    flipped labels (classification); returns them and the number of model outputs."""
    count = recipe.examples + recipe.examples // 4
    x = torch.randn(count, recipe.features, generator=generator)
    teacher_in = torch.randn(recipe.features, 16, generator=generator) / math.sqrt(recipe.features)
    teacher_out = torch.randn(16, recipe.classes, generator=generator)
    signal = torch.tanh(x @ teacher_in) @ teacher_out / 2.0
    if recipe.task == "regression":
        y = signal[:, :1] + recipe.noise * torch.randn(count, 1, generator=generator)
        outputs = 1
    else:
        y = signal.argmax(dim=1)
        flipped = torch.rand(count, generator=generator) < recipe.noise
        y = torch.where(flipped, torch.randint(0, recipe.classes, (count,), generator=generator), y)
        outputs = recipe.classes
    split = recipe.examples
    return TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:]), outputs


def _optimizer(recipe: TrainingRecipe, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=recipe.learning_rate)
    return torch.optim.SGD(parameters, lr=recipe.learning_rate, momentum=0.9 if recipe.optimizer == "momentum" else 0)


def train_recipe(recipe: TrainingRecipe) -> HealthyCurve:
    """Train the recipe's model for real; log every step's loss and, ten times a run, validation loss."""
    generator = torch.Generator().manual_seed(recipe.seed)
    train, validation, outputs = synthetic_task(recipe, generator)
    torch.manual_seed(recipe.seed)
    model = _network(recipe, outputs)
    optimizer = _optimizer(recipe, model.parameters())
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
        F.mse_loss if recipe.task == "regression" else F.cross_entropy
    )
    x, y = train.tensors
    batch_size = recipe.batch_size or len(x)
    every = max(1, recipe.steps // 10)
    order = torch.randperm(len(x), generator=generator)
    cursor = 0
    losses: list[float] = []
    validation_losses: list[float | None] = []
    for step in range(recipe.steps):
        if cursor + batch_size > len(x):
            order, cursor = torch.randperm(len(x), generator=generator), 0
        rows = order[cursor : cursor + batch_size]
        cursor += batch_size
        loss = loss_fn(model(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.item()))
        if (step + 1) % every == 0 or step + 1 == recipe.steps:
            with torch.no_grad():
                validation_losses.append(float(loss_fn(model(validation.tensors[0]), validation.tensors[1]).item()))
        else:
            validation_losses.append(None)
    return HealthyCurve(recipe.name, losses, validation_losses)


def healthy_loss_curves(count: int = 120, seed: int = 0) -> list[HealthyCurve]:
    """`count` loss curves of real, healthy training runs (about 0.05 s each on one CPU core)."""
    rng = random.Random(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threading costs more than it saves
    try:
        return [train_recipe(draw_recipe(index, rng)) for index in range(count)]
    finally:
        torch.set_num_threads(threads)


def training_alarms(curves: Sequence[HealthyCurve], thresholds: Thresholds | None = None) -> AlarmRates:
    """False alarms of the training-curve checks over healthy curves."""
    thresholds = thresholds or Thresholds()
    rates = AlarmRates()
    for curve in curves:
        rates.add(check_loss_curve(curve.loss, curve.validation_loss, thresholds).findings)
    return rates
