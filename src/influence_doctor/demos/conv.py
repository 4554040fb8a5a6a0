"""`conv`: a healthy small Conv2d classifier on synthetic 12x12 images of three stroke patterns."""

from __future__ import annotations

import torch
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from influence_doctor.demos.training import train_minibatches
from influence_doctor.pipeline import Pipeline, TrainingMonitor

SIDE = 12
CLASSES = 3


def synthetic_images(count: int, seed: int) -> TensorDataset:
    """Class 0: a horizontal bar, 1: a vertical bar, 2: a centred square; at random offsets, with noise."""
    generator = torch.Generator().manual_seed(seed)
    images = 0.3 * torch.randn(count, 1, SIDE, SIDE, generator=generator)
    labels = torch.arange(count) % CLASSES
    offsets = torch.randint(2, SIDE - 4, (count, 2), generator=generator)
    for index in range(count):
        row, col = offsets[index].tolist()
        kind = int(labels[index])
        if kind == 0:
            images[index, 0, row, 1:-1] += 1.0
        elif kind == 1:
            images[index, 0, 1:-1, col] += 1.0
        else:
            images[index, 0, row : row + 3, col : col + 3] += 1.0
    return TensorDataset(images, labels)


class ClassificationTask(Task):
    """Summed cross-entropy; labels sampled from the model's softmax for the true Fisher; margin measured."""

    def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
        images, labels = batch
        logits = model(images)
        if sample:
            with torch.no_grad():
                labels = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1).flatten()
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch, model: nn.Module) -> torch.Tensor:
        images, labels = batch
        logits = model(images)
        correct = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
        others = logits.masked_fill(F.one_hot(labels, CLASSES).bool(), float("-inf"))
        return -(correct - others.logsumexp(dim=-1)).sum()


def build_convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, CLASSES),
    )


def train_classifier(model: nn.Module, dataset: TensorDataset, monitor: TrainingMonitor, epochs: int = 8) -> None:
    train_minibatches(model, dataset, monitor, F.cross_entropy, epochs=epochs, lr=1e-2)


def conv(examples: int = 600) -> Pipeline:
    return Pipeline(
        name="conv",
        model=build_convnet,
        task=ClassificationTask(),
        train_dataset=synthetic_images(examples, seed=3),
        query_dataset=synthetic_images(12, seed=4),
        train=train_classifier,
        factor_args=FactorArguments(strategy="ekfac"),
        score_args=ScoreArguments(damping_factor=None),
        batch_size=64,
        query_batch_size=12,
    )
