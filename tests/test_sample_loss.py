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


# --- the noise of the rise and of the start's gradient, over the sample's groups --------------------------


def test_the_rise_standard_error_is_the_groups_spread_times_the_root_of_their_number():
    import statistics

    from influence_doctor.runner.sample_loss import rise_standard_error

    before = [1.0, 2.0, 3.0, 4.0, 5.0]
    after = [1.5, 1.75, 3.5, 4.0, 5.25]
    rises = [b - a for a, b in zip(before, after, strict=True)]
    assert rise_standard_error(before, after) == pytest.approx(statistics.stdev(rises) * math.sqrt(5), rel=1e-12)
    assert rise_standard_error([1.0], [2.0]) is None  # one group: no spread to measure
    assert rise_standard_error([1.0, 2.0], [1.5, 2.5]) == 0.0  # every group rose alike: no noise at all


def test_the_signal_to_noise_ratio_and_the_noise_dimensions_from_the_groups_norms():
    from influence_doctor.runner.sample_loss import gradient_snr, noise_dimensions

    # groups ±e_1 and ±e_2 (a zero total): ‖g_k‖² = 1 each, spread 4/3 per group, total 0
    assert gradient_snr(0.0, [1.0, 1.0, 1.0, 1.0]) == 0.0
    # four equal groups g: the total 4g has ‖·‖² = 16‖g‖², and no spread: all signal
    assert gradient_snr(16.0, [1.0, 1.0, 1.0, 1.0]) == math.inf
    # two groups g and 0 (‖g‖² = 2): total ‖g‖² = 2, spread (2 − 2/2)/1 = 1, noise 2·1 → ratio 1
    assert gradient_snr(2.0, [2.0, 0.0]) == pytest.approx(1.0)
    # norms of mean 2, variance 2 → d = 2·2²/2 = 4
    assert noise_dimensions([1.0, 3.0, 1.0, 3.0]) == pytest.approx(2 * 4 / (4 / 3))
    assert noise_dimensions([2.0]) is None


def _least_squares_minimum(inputs, targets) -> nn.Linear:
    """The exact float64 minimiser of the summed squared error: its gradient is zero up to rounding."""
    design = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, targets).solution
    model = nn.Linear(4, 1).double()
    with torch.no_grad():
        model.weight.copy_(solution[:4].T)
        model.bias.copy_(solution[4])
    return model


def _groups(inputs, targets, groups=16):
    def batch_losses(model):
        for rows_x, rows_y in zip(
            inputs.split(len(inputs) // groups), targets.split(len(inputs) // groups), strict=True
        ):
            yield ((model(rows_x) - rows_y) ** 2).sum()

    return batch_losses


def test_along_the_step_the_gradient_at_a_minimum_is_noise_and_off_it_is_not():
    from influence_doctor.runner.sample_loss import directional_t

    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(256, 4, generator=generator, dtype=torch.float64)
    targets = inputs @ torch.randn(4, 1, generator=generator, dtype=torch.float64) + torch.randn(
        256, 1, generator=generator, dtype=torch.float64
    )
    batch_losses = _groups(inputs, targets)
    # at the exact minimum, a random step: the directional derivatives sum to zero, whatever the step
    model = _least_squares_minimum(inputs, targets)
    start = measure_start(model, batch_losses)
    with torch.no_grad():
        for p in model.parameters():
            p += 1e-3 * torch.randn(p.shape, generator=generator, dtype=torch.float64)
    at_minimum = directional_t(start, model, batch_losses)
    assert abs(at_minimum) < 1e-6
    sample = measure_end(start, model, batch_losses, 256)
    assert sample.directional_t == pytest.approx(at_minimum, abs=1e-9) and sample.groups == 16
    assert not sample.directed(0.001)
    # away from it (a fresh model), one step up the gradient: every group's derivative points along it
    model = _model()
    start = measure_start(model, batch_losses)
    _step(model, batch_losses, -1e-4)
    away = directional_t(start, model, batch_losses)
    assert away > 10.0
    assert measure_end(start, model, batch_losses, 256).directed(0.001)
    _step(model, batch_losses, 2e-4)  # and back down past the start: the derivative points against it
    assert directional_t(start, model, batch_losses) < -10.0
