"""Converged restarts: a model trained to its minimum, then trained again with a fresh optimizer, so the
loss does not move (fine-tuning a converged model, a resumed run whose optimizer state was lost). The
healthy runs a training check must not call broken. Beside them, the same restart with the optimizer told
to maximise (a sign error), which it must.

Every factory is deterministic: the data, the warm-up and the restart are seeded by `seed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from kronfluence.arguments import FactorArguments, ScoreArguments
from torch import nn
from torch.nn import functional as F

from influence_doctor import Pipeline, TrainingMonitor
from influence_doctor.demos.uci_mlp import FEATURES, RegressionTask, synthetic_regression

EXAMPLES, QUERIES = 256, 8
WARM_STEPS = 400
"""Full-batch Adam steps that bring the model to its minimum before the user's loop starts."""

OPTIMIZERS = {
    "adam": lambda params, lr, maximize: torch.optim.Adam(params, lr=lr, maximize=maximize),
    "adamw": lambda params, lr, maximize: torch.optim.AdamW(params, lr=lr, maximize=maximize),
    "sgd-momentum": lambda params, lr, maximize: torch.optim.SGD(params, lr=lr, momentum=0.9, maximize=maximize),
    "rmsprop": lambda params, lr, maximize: torch.optim.RMSprop(params, lr=lr, maximize=maximize),
}


@dataclass(frozen=True)
class Restart:
    """One converged restart: the model, the restart's optimizer and learning rate, its steps and seed."""

    optimizer: str = "adam"
    lr: float = 0.005
    steps: int = 300
    seed: int = 0
    hidden: int = 0  # 0: a linear model; else a tanh MLP of this width
    maximize: bool = False  # the sign error

    @property
    def name(self) -> str:
        kind = "linear" if not self.hidden else f"mlp{self.hidden}"
        sign = " maximize" if self.maximize else ""
        return f"restart {kind} {self.optimizer} lr={self.lr:g} steps={self.steps} seed={self.seed}{sign}"


def full_batch(model: nn.Module, data, optimizer: torch.optim.Optimizer, steps: int, monitor=None) -> None:
    x, y = data.tensors
    model.train()
    for _ in range(steps):
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if monitor is not None:
            monitor.log(loss)
    model.eval()


def restart_pipeline(restart: Restart) -> Pipeline:
    data = synthetic_regression(EXAMPLES, seed=100 + restart.seed)

    def build() -> nn.Module:
        torch.manual_seed(restart.seed)
        if restart.hidden:
            model = nn.Sequential(nn.Linear(FEATURES, restart.hidden), nn.Tanh(), nn.Linear(restart.hidden, 1))
        else:
            model = nn.Sequential(nn.Linear(FEATURES, 1))
        full_batch(model, data, torch.optim.Adam(model.parameters(), lr=0.01), WARM_STEPS)  # converged
        return model

    def train(model: nn.Module, dataset, monitor: TrainingMonitor) -> None:
        torch.manual_seed(restart.seed)
        optimizer = OPTIMIZERS[restart.optimizer](model.parameters(), restart.lr, restart.maximize)
        full_batch(model, dataset, optimizer, restart.steps, monitor)

    return Pipeline(
        name=restart.name,
        model=build,
        task=RegressionTask(),
        train_dataset=data,
        query_dataset=synthetic_regression(QUERIES, seed=200 + restart.seed),
        train=train,
        factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True),
        score_args=ScoreArguments(damping_factor=None),
        scores=("pairwise",),
        batch_size=64,
        query_batch_size=QUERIES,
    )


RECIPES = (("adam", 0.005), ("adam", 0.02), ("adamw", 0.01), ("sgd-momentum", 0.01), ("rmsprop", 0.001))
"""The restart's optimizer and learning rate: several optimizers, small and large steps."""


def converged_restarts(seeds=range(5)) -> list[Restart]:
    """Healthy restarts over optimizers, learning rates, models and seeds."""
    runs = []
    for seed in seeds:
        for optimizer, lr in (
            ("adam", 0.005),
            ("adam", 0.02),
            ("adamw", 0.01),
            ("sgd-momentum", 0.01),
            ("rmsprop", 0.001),
        ):
            runs.append(Restart(optimizer, lr, steps=300, seed=seed))
        runs.append(Restart("adam", 0.005, steps=300, seed=seed, hidden=16))
    return runs
