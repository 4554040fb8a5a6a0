"""Exact influence (`influence_doctor.exact`) against an independent brute-force float64 computation.

The reference never touches the module's code: it writes the model as a plain function of a flat
parameter vector, takes per-example Jacobians with torch.autograd.functional.jacobian, uses the
analytic loss Hessians (MSE sum: 2·I; softmax cross-entropy: diag(p) − ppᵀ) and solves directly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kronfluence.analyzer import prepare_model
from torch import nn
from torch.autograd.functional import jacobian
from torch.utils.data import TensorDataset

from influence_doctor.demos.conv import CLASSES, ClassificationTask
from influence_doctor.demos.uci_mlp import RegressionTask
from influence_doctor.exact import MAX_OUTPUTS, exact_pairwise, gauss_newton, single_example_batches, tracked_parameters

TIGHT = {"rtol": 1e-9, "atol": 1e-11}


def forward_of(model):
    """The doctor's `forward`: the model outputs for one batch (inputs first)."""
    return lambda batch: model(batch[0])


def unflatten(theta, shapes):
    pieces, start = [], 0
    for shape in shapes:
        size = int(torch.Size(shape).numel())
        pieces.append(theta[start : start + size].reshape(shape))
        start += size
    assert start == theta.numel()
    return pieces


def reference_scores(f, theta, train, queries, loss_hessian, train_loss, measurement, damping):
    """scores = Qg (G/n + δI)⁻¹ Tgᵀ with G = Σ JᵀHJ, all in float64 from first principles."""
    theta = theta.detach().double()
    p = theta.numel()
    g = torch.zeros(p, p, dtype=torch.float64)
    for x, y in train:
        j = jacobian(lambda th, x=x: f(th, x), theta)  # k × p
        z = f(theta, x).detach()
        g += j.T @ loss_hessian(z, y) @ j
    g /= len(train)
    delta = 0.1 * torch.trace(g).item() / p if damping is None else damping
    curvature = g + delta * torch.eye(p, dtype=torch.float64)
    tg = torch.stack([jacobian(lambda th, x=x, y=y: train_loss(f(th, x), y), theta) for x, y in train])
    qg = torch.stack([jacobian(lambda th, x=x, y=y: measurement(f(th, x), y), theta) for x, y in queries])
    return qg @ torch.linalg.solve(curvature, tg.T), delta, g


# ----------------------------------------------------------------------------------------- regression


def mse_hessian(z, y):
    return 2.0 * torch.eye(z.numel(), dtype=torch.float64)


def mse_sum(z, y):
    return ((z - y) ** 2).sum()


def mlp_function(shapes):
    def f(theta, x):
        w1, b1, w2, b2 = unflatten(theta, shapes)
        return w2 @ torch.tanh(w1 @ x + b1) + b2

    return f


def regression_setup(dtype=torch.float64, seed=0, n_train=6, n_query=3):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(dtype)
    model = prepare_model(model, RegressionTask())
    x = torch.randn(n_train + n_query, 3, dtype=dtype)
    y = torch.randn(n_train + n_query, 1, dtype=dtype)
    train = TensorDataset(x[:n_train], y[:n_train])
    query = TensorDataset(x[n_train:], y[n_train:])
    return model, train, query


def test_tracked_parameters_are_the_linear_weights_and_biases_in_module_order():
    model, _, _ = regression_setup()
    expected = [
        model[0].original_module.weight,
        model[0].original_module.bias,
        model[2].original_module.weight,
        model[2].original_module.bias,
    ]
    params = tracked_parameters(model)
    assert [id(p) for p in params] == [id(p) for p in expected]
    assert sum(p.numel() for p in params) == 4 * 3 + 4 + 4 + 1
    # kronfluence's own bookkeeping parameter is not part of the influence computation
    assert all("_constant" not in name for name, p in model.named_parameters() if any(p is q for q in params))


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_regression_mlp_matches_brute_force(damping):
    model, train, query = regression_setup()
    params = tracked_parameters(model)
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    f = mlp_function([p.shape for p in params])
    expected, _, _ = reference_scores(
        f,
        theta,
        list(zip(*train.tensors, strict=True)),
        list(zip(*query.tensors, strict=True)),
        mse_hessian,
        mse_sum,
        mse_sum,
        damping,
    )
    scores, delta = exact_pairwise(
        model,
        RegressionTask(),
        single_example_batches(train),
        single_example_batches(query),
        damping,
        forward_of(model),
    )
    assert delta == damping
    assert scores.dtype == torch.float64
    assert scores.shape == (3, 6)
    torch.testing.assert_close(scores, expected, **TIGHT)


def test_damping_none_uses_a_tenth_of_the_mean_eigenvalue_of_g_over_n():
    model, train, query = regression_setup(seed=1)
    params = tracked_parameters(model)
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    f = mlp_function([p.shape for p in params])
    expected, expected_delta, g = reference_scores(
        f,
        theta,
        list(zip(*train.tensors, strict=True)),
        list(zip(*query.tensors, strict=True)),
        mse_hessian,
        mse_sum,
        mse_sum,
        None,
    )
    scores, delta = exact_pairwise(
        model, RegressionTask(), single_example_batches(train), single_example_batches(query), None, forward_of(model)
    )
    p = theta.numel()
    assert delta == pytest.approx(0.1 * torch.trace(g).item() / p, rel=1e-12)
    assert delta == pytest.approx(0.1 * torch.linalg.eigvalsh(g).mean().item(), rel=1e-10)
    assert delta == pytest.approx(expected_delta, rel=1e-12)
    assert delta > 0
    torch.testing.assert_close(scores, expected, **TIGHT)


def test_only_tracked_modules_enter_the_curvature():
    class LastLayerTask(RegressionTask):
        def get_influence_tracked_modules(self):
            return ["2"]

    torch.manual_seed(2)
    model = prepare_model(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double(), LastLayerTask())
    params = tracked_parameters(model)
    assert [id(p) for p in params] == [id(model[2].original_module.weight), id(model[2].original_module.bias)]
    w1, b1 = model[0].weight.detach(), model[0].bias.detach()

    def f(theta, x):
        w2, b2 = unflatten(theta, [(2, 4), (2,)])
        return w2 @ torch.tanh(w1 @ x + b1) + b2

    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    train, query = TensorDataset(x[:5], y[:5]), TensorDataset(x[5:], y[5:])
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    expected, _, _ = reference_scores(
        f,
        theta,
        list(zip(*train.tensors, strict=True)),
        list(zip(*query.tensors, strict=True)),
        mse_hessian,
        mse_sum,
        mse_sum,
        1e-2,
    )
    scores, _ = exact_pairwise(
        model, LastLayerTask(), single_example_batches(train), single_example_batches(query), 1e-2, forward_of(model)
    )
    assert scores.shape == (2, 5)
    torch.testing.assert_close(scores, expected, **TIGHT)


def test_float32_model_agrees_with_float64_reference_to_float32_accuracy():
    model, train, query = regression_setup(dtype=torch.float32, seed=3)
    params = tracked_parameters(model)
    theta = torch.cat([p.detach().reshape(-1) for p in params]).double()
    f = mlp_function([p.shape for p in params])
    as64 = lambda ds: list(zip(*(t.double() for t in ds.tensors), strict=True))  # noqa: E731
    expected, _, _ = reference_scores(f, theta, as64(train), as64(query), mse_hessian, mse_sum, mse_sum, 0.1)
    scores, _ = exact_pairwise(
        model, RegressionTask(), single_example_batches(train), single_example_batches(query), 0.1, forward_of(model)
    )
    assert scores.dtype == torch.float64
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- classification


def softmax_ce_hessian(z, y):
    p = torch.softmax(z, dim=-1)
    return torch.diag(p) - torch.outer(p, p)


def cross_entropy(z, y):
    return -torch.log_softmax(z, dim=-1)[y]


def negative_margin(z, y):
    """−(z_y − logsumexp of the other logits), written without the demo's code."""
    others = torch.cat([z[:y], z[y + 1 :]])
    return -(z[y] - torch.logsumexp(others, dim=0))


@pytest.mark.parametrize("damping", [1e-3, None])
def test_classifier_cross_entropy_and_margin_match_brute_force(damping):
    torch.manual_seed(4)
    model = prepare_model(nn.Sequential(nn.Linear(3, CLASSES)).double(), ClassificationTask())
    params = tracked_parameters(model)
    assert [p.shape for p in params] == [torch.Size([CLASSES, 3]), torch.Size([CLASSES])]

    def f(theta, x):
        w, b = unflatten(theta, [(CLASSES, 3), (CLASSES,)])
        return w @ x + b

    x = 2.0 * torch.randn(9, 3, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (9,))
    train, query = TensorDataset(x[:6], y[:6]), TensorDataset(x[6:], y[6:])
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    expected, expected_delta, _ = reference_scores(
        f,
        theta,
        [(x[i], int(y[i])) for i in range(6)],
        [(x[i], int(y[i])) for i in range(6, 9)],
        softmax_ce_hessian,
        cross_entropy,
        negative_margin,
        damping,
    )
    scores, delta = exact_pairwise(
        model,
        ClassificationTask(),
        single_example_batches(train),
        single_example_batches(query),
        damping,
        forward_of(model),
    )
    assert delta == pytest.approx(expected_delta, rel=1e-12)
    assert scores.shape == (3, 6)
    torch.testing.assert_close(scores, expected, **TIGHT)
    # the reference's margin really is the demo's measurement (sanity of the reference itself)
    batch = single_example_batches(query)[0]
    demo = ClassificationTask().compute_measurement(batch, model)
    assert demo.item() == pytest.approx(negative_margin(f(theta, x[6]), int(y[6])).item(), rel=1e-12)


def test_gauss_newton_of_softmax_is_the_sum_of_jt_h_j():
    torch.manual_seed(5)
    model = prepare_model(nn.Sequential(nn.Linear(2, CLASSES)).double(), ClassificationTask())
    params = tracked_parameters(model)
    for p in params:
        p.requires_grad_(True)
    x, y = torch.randn(4, 2, dtype=torch.float64), torch.randint(0, CLASSES, (4,))
    batches = single_example_batches(TensorDataset(x, y))
    w, b = (p.detach() for p in params)

    def loss_of_outputs(batch, outputs):
        return F.cross_entropy(outputs, batch[1], reduction="sum")

    total = gauss_newton(model, loss_of_outputs, batches, forward_of(model), params)
    expected = torch.zeros_like(total)
    for i in range(4):
        # logits = W x + b: d logits / d vec(W) = I ⊗ xᵀ, d logits / d b = I
        j = torch.cat(
            [
                torch.kron(torch.eye(CLASSES, dtype=torch.float64), x[i : i + 1]),
                torch.eye(CLASSES, dtype=torch.float64),
            ],
            dim=1,
        )
        expected += j.T @ softmax_ce_hessian(w @ x[i] + b, y[i]) @ j
    assert total.dtype == torch.float64
    torch.testing.assert_close(total, expected, **TIGHT)
    torch.testing.assert_close(total, total.T, rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------ side effects


def test_requires_grad_flags_are_restored_afterwards():
    model, train, query = regression_setup(seed=6)
    params = tracked_parameters(model)
    flags = [True, False, False, True]
    for p, flag in zip(params, flags, strict=True):
        p.requires_grad_(flag)
    exact_pairwise(
        model, RegressionTask(), single_example_batches(train), single_example_batches(query), 0.1, forward_of(model)
    )
    assert [p.requires_grad for p in params] == flags


def test_prepared_model_parameters_stay_frozen_and_gradients_untouched():
    model, train, query = regression_setup(seed=7)
    params = tracked_parameters(model)
    assert not any(p.requires_grad for p in params)  # prepare_model froze them
    before = [p.detach().clone() for p in params]
    exact_pairwise(
        model, RegressionTask(), single_example_batches(train), single_example_batches(query), 0.1, forward_of(model)
    )
    assert not any(p.requires_grad for p in params)
    assert all(p.grad is None for p in params)  # autograd.grad, not backward: nothing accumulated
    for p, old in zip(params, before, strict=True):
        assert torch.equal(p.detach(), old)


def test_too_many_outputs_raise_in_gauss_newton():
    torch.manual_seed(8)
    model = prepare_model(nn.Sequential(nn.Linear(2, MAX_OUTPUTS + 1)).double(), RegressionTask())
    params = tracked_parameters(model)
    for p in params:
        p.requires_grad_(True)
    x, y = torch.randn(2, 2, dtype=torch.float64), torch.randn(2, MAX_OUTPUTS + 1, dtype=torch.float64)
    batches = single_example_batches(TensorDataset(x, y))
    with pytest.raises(ValueError, match=f"{MAX_OUTPUTS + 1} outputs"):
        gauss_newton(model, lambda b, z: mse_sum(z, b[1]), batches, forward_of(model), params)


def test_exactly_max_outputs_is_allowed():
    torch.manual_seed(9)
    model = prepare_model(nn.Sequential(nn.Linear(1, MAX_OUTPUTS)).double(), RegressionTask())
    params = tracked_parameters(model)
    for p in params:
        p.requires_grad_(True)
    batches = single_example_batches(TensorDataset(torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, MAX_OUTPUTS)))
    total = gauss_newton(model, lambda b, z: mse_sum(z, b[1].double()), batches, forward_of(model), params)
    # outputs = W·1 + b: J = [I, I], JᵀHJ = 2·[[I, I], [I, I]]
    eye = torch.eye(MAX_OUTPUTS, dtype=torch.float64)
    torch.testing.assert_close(total, 2.0 * torch.cat([torch.cat([eye, eye], 1)] * 2, 0), **TIGHT)


def test_flags_are_restored_when_the_outputs_are_too_many():
    torch.manual_seed(10)
    model = prepare_model(nn.Sequential(nn.Linear(2, MAX_OUTPUTS + 1)).double(), RegressionTask())
    params = tracked_parameters(model)
    x, y = torch.randn(2, 2, dtype=torch.float64), torch.randn(2, MAX_OUTPUTS + 1, dtype=torch.float64)
    batches = single_example_batches(TensorDataset(x, y))
    with pytest.raises(ValueError):
        exact_pairwise(model, RegressionTask(), batches, batches, 0.1, forward_of(model))
    assert not any(p.requires_grad for p in params)


def test_single_example_batches_collate_like_a_dataloader():
    x, y = torch.arange(12.0).reshape(4, 3), torch.arange(4)
    batches = single_example_batches(TensorDataset(x, y))
    assert len(batches) == 4
    assert batches[2][0].shape == (1, 3) and torch.equal(batches[2][0][0], x[2])
    assert batches[2][1].shape == (1,) and int(batches[2][1]) == 2
    assert len(single_example_batches(TensorDataset(x, y), count=2)) == 2
    assert len(single_example_batches(TensorDataset(x, y), count=10)) == 4
