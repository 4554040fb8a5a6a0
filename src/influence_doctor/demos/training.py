"""The minibatch training loop the small demos share: Adam, shuffled batches, loss logged per step."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import TensorDataset

from influence_doctor.pipeline import TrainingMonitor


def train_minibatches(
    model: nn.Module,
    dataset: TensorDataset,
    monitor: TrainingMonitor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    lr: float,
    batch_size: int = 64,
) -> None:
    device = next(model.parameters()).device
    x, y = (tensor.to(device) for tensor in dataset.tensors)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator).to(device)
        for start in range(0, len(x), batch_size):
            rows = order[start : start + batch_size]
            loss = loss_fn(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.log(loss)
    model.eval()
