"""Small pipelines for the tests: a linear regression model that finishes in well under a second."""

from __future__ import annotations

import torch
from kronfluence.arguments import FactorArguments, ScoreArguments
from torch import nn
from torch.utils.data import TensorDataset

from influence_doctor import Pipeline, TrainingMonitor
from influence_doctor.demos.uci_mlp import RegressionTask


def regression_data(count: int = 64, features: int = 4, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, features, generator=generator)
    y = x @ torch.arange(1.0, features + 1) + 0.1 * torch.randn(count, generator=generator)
    return TensorDataset(x, y.unsqueeze(1))


def build_small_mlp(features: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, 8), nn.Tanh(), nn.Linear(8, 1))


def quick_train(model: nn.Module, dataset: TensorDataset, monitor: TrainingMonitor) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    device = next(model.parameters()).device
    x, y = (tensor.to(device) for tensor in dataset.tensors)
    for _ in range(20):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.log(loss)


def small_pipeline(**overrides) -> Pipeline:
    settings = dict(
        name="small",
        model=build_small_mlp,
        task=RegressionTask(),
        train_dataset=regression_data(64),
        query_dataset=regression_data(4, seed=1),
        train=quick_train,
        factor_args=FactorArguments(strategy="ekfac"),
        score_args=ScoreArguments(damping_factor=None),
        batch_size=16,
        query_batch_size=4,
    )
    settings.update(overrides)
    return Pipeline(**settings)


def small() -> Pipeline:
    """Zero-argument factory, as a TARGET would name it."""
    return small_pipeline()


def small_twin() -> Pipeline:
    """A second small pipeline under its own name: two pipelines for the pytest-xdist tests."""
    return small_pipeline(name="small-twin", train_dataset=regression_data(48, seed=2))


SMALL = small_pipeline()


def not_a_pipeline() -> int:
    return 42


def factory_that_raises() -> Pipeline:
    raise RuntimeError("the dataset server is down")


WIDE = 768
"""A Linear wide enough that its per-sample gradients (64 × 769 × 768 floats, 150 MB a copy) dominate Λ."""


def wide_lambda(iterative: bool = False) -> Pipeline:
    """A pipeline whose lambda stage's memory is its per-sample gradients, for the memory projection."""

    def data(count: int, seed: int) -> TensorDataset:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(count, WIDE, generator=generator)
        return TensorDataset(x, x[:, :1] + 0.1 * torch.randn(count, 1, generator=generator))

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(WIDE, WIDE), nn.Tanh(), nn.Linear(WIDE, 1))

    return Pipeline(
        name="wide-lambda-iterative" if iterative else "wide-lambda",
        model=model,
        task=RegressionTask(),
        train_dataset=data(512, seed=0),
        query_dataset=data(4, seed=1),
        factor_args=FactorArguments(strategy="ekfac", use_iterative_lambda_aggregation=iterative),
        score_args=ScoreArguments(),
        scores=("pairwise",),
        batch_size=64,
        query_batch_size=4,
    )


def wide_lambda_iterative() -> Pipeline:
    return wide_lambda(iterative=True)
