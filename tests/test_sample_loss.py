"""The doctor's before/after measurement of training (`runner.sample_loss`), against exact references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from influence_doctor.runner.sample_loss import fresh_copy, measure_end, measure_start, uphill_cosine


def _data():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(32, 4, generator=generator, dtype=torch.float64), torch.randn(
        32, 1, generator=generator, dtype=torch.float64
    )


def _losses(inputs, targets):
    def batch_losses(model):
        for rows in (slice(0, 16), slice(16, 32)):  # two batches, summed by the measurement
            yield ((model(inputs[rows]) - targets[rows]) ** 2).sum()

    return batch_losses


def _model():
    torch.manual_seed(1)
    return nn.Linear(4, 1).double()


def _step(model, batch_losses, lr):
    loss = sum(batch_losses(model))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads, strict=True):
            p -= lr * g


@pytest.mark.parametrize(("lr", "expected"), [(1e-3, -1.0), (-1e-3, 1.0)])
def test_one_gradient_step_has_cosine_minus_one_and_ascent_plus_one(lr, expected):
    inputs, targets = _data()
    batch_losses, model = _losses(inputs, targets), _model()
    start = measure_start(model, batch_losses)
    _step(model, batch_losses, lr)
    assert uphill_cosine(start, model) == pytest.approx(expected, abs=1e-6)
    sample = measure_end(start, model, batch_losses, 32)
    assert (sample.trained < sample.untrained) == (lr > 0)
    with torch.no_grad():
        expected_untrained = float(sum(_losses(inputs, targets)(_model())))
    assert sample.untrained == pytest.approx(expected_untrained)


def test_the_measurement_leaves_the_users_model_as_it_was():
    """Gradients, mode and the random state: the user's loop must see exactly what it would have seen."""
    inputs, targets = _data()
    model = _model()
    model.train()
    sentinel = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), sentinel, strict=True):
        p.grad = g.clone()
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(5)
    start = measure_start(model, _losses(inputs, targets))
    draw = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(draw, torch.rand(3))
    assert model.training
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), sentinel, strict=True))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert start.reference is not None and start.gradient is not None


def test_a_fresh_copy_is_reinitialised_deterministically_and_the_model_untouched():
    model = _model()
    with torch.no_grad():
        model.weight.fill_(3.0)
    first, second = fresh_copy(model), fresh_copy(model)
    assert torch.equal(first.weight, second.weight)
    assert not torch.equal(first.weight, model.weight)
    assert torch.all(model.weight == 3.0)


def test_a_model_beyond_the_budget_gets_only_its_losses():
    inputs, targets = _data()
    model = _model()
    start = measure_start(model, _losses(inputs, targets), budget_bytes=8)
    assert (start.reference, start.gradient, start.parameters) == (None, None, None)
    sample = measure_end(start, model, _losses(inputs, targets), 32)
    assert sample.uphill_cosine is None and sample.reference is None
    assert math.isfinite(sample.trained)


def test_a_model_that_fits_one_copy_gets_its_reference_but_no_cosine():
    inputs, targets = _data()
    model = _model()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    start = measure_start(model, _losses(inputs, targets), budget_bytes=size)
    assert start.reference is not None and start.gradient is None


def test_no_movement_has_no_cosine():
    inputs, targets = _data()
    model = _model()
    start = measure_start(model, _losses(inputs, targets))
    assert uphill_cosine(start, model) is None
