"""`uci-mlp`: a healthy regression MLP on synthetic tabular data shaped like the UCI regression sets.

Its factors are well conditioned and fp32 throughout; the doctor must call it healthy.
"""

from __future__ import annotations

import torch
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from influence_doctor.demos.training import train_minibatches
from influence_doctor.pipeline import Pipeline, TrainingMonitor

FEATURES = 8


def synthetic_regression(count: int, seed: int) -> TensorDataset:
    """Standardised features, a smooth nonlinear target and a little noise."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, FEATURES, generator=generator)
    weights = torch.linspace(-1.0, 1.0, FEATURES)
    y = torch.sin(x @ weights) + 0.5 * x[:, 0] * x[:, 1] + 0.1 * torch.randn(count, generator=generator)
    return TensorDataset(x, y.unsqueeze(1))


class RegressionTask(Task):
    """Summed squared error; sampled targets add unit Gaussian noise to the prediction (true Fisher)."""

    def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
        inputs, targets = batch
        outputs = model(inputs)
        if sample:
            with torch.no_grad():
                targets = outputs.detach() + torch.randn_like(outputs)
        return F.mse_loss(outputs, targets, reduction="sum")

    def compute_measurement(self, batch, model: nn.Module) -> torch.Tensor:
        return self.compute_train_loss(batch, model, sample=False)


def build_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))


def train_regression(model: nn.Module, dataset: TensorDataset, monitor: TrainingMonitor, epochs: int = 30) -> None:
    train_minibatches(model, dataset, monitor, F.mse_loss, epochs=epochs, lr=3e-3)


def uci_mlp(examples: int = 1000) -> Pipeline:
    return Pipeline(
        name="uci-mlp",
        model=build_mlp,
        task=RegressionTask(),
        train_dataset=synthetic_regression(examples, seed=1),
        query_dataset=synthetic_regression(16, seed=2),
        train=train_regression,
        factor_args=FactorArguments(strategy="ekfac"),
        score_args=ScoreArguments(damping_factor=None),  # kronfluence's heuristic: 0.1 x mean eigenvalue
        batch_size=128,
        query_batch_size=16,
    )
