"""Exact influence (`influence_doctor.exact`) against real kronfluence and an independent brute-force reference.

Where EK-FAC is exact (one training example, deterministic pseudo-gradients) kronfluence's own float64
pairwise scores must match to rounding. Elsewhere the reference never touches the module's code: it writes the
model as a plain function of a flat parameter vector, takes per-example gradients with
torch.autograd.functional.jacobian, builds each module's Fisher block as (1/n) Σ u uᵀ, damps it (explicitly or
with 0.1 × its mean eigenvalue) and inverts it directly.
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from torch import nn
from torch.autograd.functional import jacobian
from torch.utils.data import TensorDataset

from influence_doctor.demos.conv import CLASSES, ClassificationTask
from influence_doctor.demos.uci_mlp import RegressionTask
from influence_doctor.exact import (
    MAX_PARAMETERS,
    BlockFisher,
    exact_fidelity,
    exact_pairwise,
    fisher_blocks,
    single_example_batches,
    tracked_blocks,
    tracked_parameters,
)

TIGHT = {"rtol": 1e-9, "atol": 1e-11}
NOISE_SEED = 123


def fixed_noise(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(NOISE_SEED), dtype=dtype)


class FixedNoiseTask(RegressionTask):
    """Summed squared error whose sampled targets are the prediction plus noise from a fixed seed: the
    pseudo-gradient is deterministic, so kronfluence's covariance and lambda passes see the same one."""

    def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
        inputs, targets = batch
        outputs = model(inputs)
        if sample:
            targets = outputs.detach() + fixed_noise(tuple(outputs.shape), outputs.dtype)
        return F.mse_loss(outputs, targets, reduction="sum")


class EmpiricalFisherTask(ClassificationTask):
    """The demo classifier's loss and margin, with the true labels as the 'sampled' ones."""

    def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
        return super().compute_train_loss(batch, model, sample=False)


def unflatten(theta, shapes):
    pieces, start = [], 0
    for shape in shapes:
        size = int(torch.Size(shape).numel())
        pieces.append(theta[start : start + size].reshape(shape))
        start += size
    assert start == theta.numel()
    return pieces


def reference_scores(f, theta, block_sizes, train, queries, pseudo_loss, train_loss, measurement, damping):
    """Σ_m g_q,mᵀ (F_m + δ_m I)⁻¹ g_i,m with F_m = (1/n) Σ u_m u_mᵀ, all in float64 from first principles.
    Returns the scores, the dampings and the Fisher blocks."""
    theta = theta.detach().double()
    assert sum(block_sizes) == theta.numel()

    def gradients(loss, examples):
        return torch.stack([jacobian(lambda th, x=x, y=y: loss(f(th, x), y), theta) for x, y in examples])

    pseudo, tg, qg = gradients(pseudo_loss, train), gradients(train_loss, train), gradients(measurement, queries)
    scores = torch.zeros(len(queries), len(train), dtype=torch.float64)
    dampings, fishers, start = [], [], 0
    for size in block_sizes:
        block = slice(start, start + size)
        fisher = pseudo[:, block].T @ pseudo[:, block] / len(train)
        delta = 0.1 * torch.linalg.eigvalsh(fisher).mean().item() if damping is None else damping
        inverse = torch.linalg.inv(fisher + delta * torch.eye(size, dtype=torch.float64))
        scores += qg[:, block] @ inverse @ tg[:, block].T
        dampings.append(delta)
        fishers.append(fisher)
        start += size
    return scores, dampings, fishers


def examples(dataset):
    return list(zip(*dataset.tensors, strict=True))


# ----------------------------------------------------------------------------------------- regression


def fixed_noise_loss(z, y):
    """The sampled loss of FixedNoiseTask for one example, written without it: targets z + ε, ε held fixed."""
    noise = fixed_noise((1, z.numel()), torch.float64).reshape(z.shape)
    return ((z - (z.detach() + noise)) ** 2).sum()


def mse_sum(z, y):
    return ((z - y) ** 2).sum()


def mlp_function(shapes):
    def f(theta, x):
        w1, b1, w2, b2 = unflatten(theta, shapes)
        return w2 @ torch.tanh(w1 @ x + b1) + b2

    return f


def regression_setup(task=None, dtype=torch.float64, seed=0, n_train=6, n_query=3, outputs=1):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, outputs)).to(dtype)
    model = prepare_model(model, task or FixedNoiseTask())
    x = torch.randn(n_train + n_query, 3, dtype=dtype)
    y = torch.randn(n_train + n_query, outputs, dtype=dtype)
    return model, TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def regression_reference(model, train, query, damping):
    params = tracked_parameters(model)
    theta = torch.cat([p.detach().reshape(-1) for p in params]).double()
    f = mlp_function([p.shape for p in params])
    as64 = lambda ds: [(x.double(), y.double()) for x, y in examples(ds)]  # noqa: E731
    sizes = [block.size for block in tracked_blocks(model)]
    return reference_scores(f, theta, sizes, as64(train), as64(query), fixed_noise_loss, mse_sum, mse_sum, damping)


def test_tracked_blocks_are_the_linear_weights_and_biases_in_module_order():
    model, _, _ = regression_setup()
    blocks = tracked_blocks(model)
    assert [block.name for block in blocks] == ["0", "2"]
    assert [block.size for block in blocks] == [4 * 3 + 4, 4 + 1]
    expected = [
        model[0].original_module.weight,
        model[0].original_module.bias,
        model[2].original_module.weight,
        model[2].original_module.bias,
    ]
    assert [id(p) for p in tracked_parameters(model)] == [id(p) for p in expected]
    # kronfluence's own bookkeeping parameter is not part of the influence computation
    assert all(p is not m._constant for m in (model[0], model[2]) for p in tracked_parameters(model))


@pytest.mark.parametrize("damping", [1e-3, 0.5, None])
def test_regression_mlp_matches_brute_force(damping):
    # 6 examples: the first block (16 parameters) is solved low rank, the second (5) densely
    model, train, query = regression_setup()
    expected, expected_dampings, _ = regression_reference(model, train, query, damping)
    scores, dampings = exact_pairwise(
        model, FixedNoiseTask(), single_example_batches(train), single_example_batches(query), damping
    )
    assert scores.dtype == torch.float64
    assert scores.shape == (3, 6)
    assert list(dampings) == ["0", "2"]
    assert list(dampings.values()) == pytest.approx(expected_dampings, rel=1e-10)
    torch.testing.assert_close(scores, expected, **TIGHT)


def test_damping_none_is_a_tenth_of_each_modules_own_mean_eigenvalue():
    model, train, query = regression_setup(seed=1)
    expected, _, fishers = regression_reference(model, train, query, None)
    scores, dampings = exact_pairwise(
        model, FixedNoiseTask(), single_example_batches(train), single_example_batches(query), None
    )
    for (name, delta), fisher in zip(dampings.items(), fishers, strict=True):
        assert delta == pytest.approx(0.1 * torch.linalg.eigvalsh(fisher).mean().item(), rel=1e-10), name
        assert delta == pytest.approx(0.1 * torch.trace(fisher).item() / fisher.shape[0], rel=1e-12), name
    first, second = dampings.values()
    assert first > 0 and second > 0 and not math.isclose(first, second, rel_tol=0.1)
    torch.testing.assert_close(scores, expected, **TIGHT)
    # one global heuristic damping over all parameters would give other scores
    big = torch.block_diag(*fishers)
    global_delta = 0.1 * torch.trace(big).item() / big.shape[0]
    global_scores, _ = exact_pairwise(
        model, FixedNoiseTask(), single_example_batches(train), single_example_batches(query), global_delta
    )
    assert not torch.allclose(global_scores, scores, rtol=1e-3)


def test_only_tracked_modules_enter_the_curvature():
    class LastLayerTask(FixedNoiseTask):
        def get_influence_tracked_modules(self):
            return ["2"]

    torch.manual_seed(2)
    model = prepare_model(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double(), LastLayerTask())
    assert [block.name for block in tracked_blocks(model)] == ["2"]
    w1, b1 = model[0].weight.detach(), model[0].bias.detach()

    def f(theta, x):
        w2, b2 = unflatten(theta, [(2, 4), (2,)])
        return w2 @ torch.tanh(w1 @ x + b1) + b2

    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    train, query = TensorDataset(x[:5], y[:5]), TensorDataset(x[5:], y[5:])
    theta = torch.cat([p.detach().reshape(-1) for p in tracked_parameters(model)])
    expected, _, _ = reference_scores(
        f, theta, [10], examples(train), examples(query), fixed_noise_loss, mse_sum, mse_sum, 1e-2
    )
    scores, dampings = exact_pairwise(
        model, LastLayerTask(), single_example_batches(train), single_example_batches(query), 1e-2
    )
    assert dampings == {"2": 1e-2}
    assert scores.shape == (2, 5)
    torch.testing.assert_close(scores, expected, **TIGHT)


def test_float32_model_agrees_with_float64_reference_to_float32_accuracy():
    model, train, query = regression_setup(dtype=torch.float32, seed=3)
    expected, _, _ = regression_reference(model, train, query, 0.1)
    scores, _ = exact_pairwise(
        model, FixedNoiseTask(), single_example_batches(train), single_example_batches(query), 0.1
    )
    assert scores.dtype == torch.float64
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- classification


def cross_entropy(z, y):
    return -torch.log_softmax(z, dim=-1)[y]


def negative_margin(z, y):
    """−(z_y − logsumexp of the other logits), written without the demo's code."""
    others = torch.cat([z[:y], z[y + 1 :]])
    return -(z[y] - torch.logsumexp(others, dim=0))


@pytest.mark.parametrize("damping", [1e-3, None])
def test_classifier_cross_entropy_and_margin_match_brute_force(damping):
    torch.manual_seed(4)
    model = prepare_model(nn.Sequential(nn.Linear(3, CLASSES)).double(), EmpiricalFisherTask())

    def f(theta, x):
        w, b = unflatten(theta, [(CLASSES, 3), (CLASSES,)])
        return w @ x + b

    x = 2.0 * torch.randn(9, 3, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (9,))
    train, query = TensorDataset(x[:6], y[:6]), TensorDataset(x[6:], y[6:])
    theta = torch.cat([p.detach().reshape(-1) for p in tracked_parameters(model)])
    expected, expected_dampings, _ = reference_scores(
        f,
        theta,
        [4 * CLASSES],
        [(x[i], int(y[i])) for i in range(6)],
        [(x[i], int(y[i])) for i in range(6, 9)],
        cross_entropy,
        cross_entropy,
        negative_margin,
        damping,
    )
    scores, dampings = exact_pairwise(
        model, EmpiricalFisherTask(), single_example_batches(train), single_example_batches(query), damping
    )
    assert list(dampings.values()) == pytest.approx(expected_dampings, rel=1e-10)
    assert scores.shape == (3, 6)
    torch.testing.assert_close(scores, expected, **TIGHT)
    # the reference's margin really is the demo's measurement (sanity of the reference itself)
    demo = ClassificationTask().compute_measurement(single_example_batches(query)[0], model)
    assert demo.item() == pytest.approx(negative_margin(f(theta, x[6]), int(y[6])).item(), rel=1e-12)


# ------------------------------------------------------------------------------ sampled pseudo-gradients


def test_random_sampling_estimates_the_fisher_e_ggt_which_is_four_jtj_for_summed_squared_error():
    """Targets drawn as prediction + N(0,1): g = −2εJᵀ, so E[g gᵀ] = 4·JᵀJ (the Gauss-Newton matrix is 2·JᵀJ).
    With one output every draw is a multiple of Jᵀ, so the estimate is exactly c·JᵀJ with c → 4."""
    model, train, _ = regression_setup(task=RegressionTask(), seed=5, n_train=1)
    params = tracked_parameters(model)
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    f = mlp_function([p.shape for p in params])
    x, _ = examples(train)[0]
    jt_j = (lambda j: j.T @ j)(jacobian(lambda th: f(th, x), theta))
    for p in params:
        p.requires_grad_(True)
    fishers = fisher_blocks(model, RegressionTask(), tracked_blocks(model), single_example_batches(train), samples=800)
    estimate = torch.block_diag(*(fisher.dense() for fisher in fishers.values()))
    blocks_of_jt_j = torch.block_diag(jt_j[:16, :16], jt_j[16:, 16:])
    scale = torch.trace(estimate).item() / torch.trace(blocks_of_jt_j).item()
    assert 3.6 < scale < 4.4
    torch.testing.assert_close(estimate, scale * blocks_of_jt_j, **TIGHT)
    assert sum(fisher.count for fisher in fishers.values()) == 2 * 800


def test_random_draws_are_seeded_and_leave_the_callers_rng_alone():
    model, train, query = regression_setup(task=RegressionTask(), seed=6)
    batches = single_example_batches(train), single_example_batches(query)
    before = torch.get_rng_state()
    first, _ = exact_pairwise(model, RegressionTask(), *batches, None, samples=3)
    assert torch.equal(torch.get_rng_state(), before)
    again, _ = exact_pairwise(model, RegressionTask(), *batches, None, samples=3)
    other_seed, _ = exact_pairwise(model, RegressionTask(), *batches, None, samples=3, seed=1)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other_seed, rtol=1e-6)


def test_identical_draws_merge_so_a_deterministic_task_gives_the_same_fisher_at_rank_n():
    model, train, query = regression_setup(seed=7, n_train=4)
    for p in tracked_parameters(model):
        p.requires_grad_(True)
    blocks, batches = tracked_blocks(model), single_example_batches(train)
    once = fisher_blocks(model, FixedNoiseTask(), blocks, batches, samples=1)
    thrice = fisher_blocks(model, FixedNoiseTask(), blocks, batches, samples=3)
    assert len(thrice["0"].rows) == 4 and thrice["0"].count == 12
    torch.testing.assert_close(thrice["0"].dense(), once["0"].dense(), **TIGHT)
    torch.testing.assert_close(thrice["2"].dense(), once["2"].dense(), **TIGHT)
    single, _ = exact_pairwise(model, FixedNoiseTask(), batches, single_example_batches(query), 0.01, samples=1)
    triple, _ = exact_pairwise(model, FixedNoiseTask(), batches, single_example_batches(query), 0.01, samples=3)
    torch.testing.assert_close(triple, single, **TIGHT)


# ------------------------------------------------------------------------------ low rank against dense


@pytest.mark.parametrize("damping", [1e-6, 1e-2, 10.0])
def test_low_rank_and_dense_solves_agree_with_a_direct_inverse(damping):
    generator = torch.Generator().manual_seed(8)
    size, rows = 40, 7
    fisher = BlockFisher(size)
    for _ in range(rows):  # two draws per example, one of them repeated: merged rows, count 3 each
        first, second = (torch.randn(size, generator=generator, dtype=torch.float64) for _ in range(2))
        fisher.add_example([first, second, first])
    assert fisher.low_rank and len(fisher.rows) == 2 * rows and fisher.count == 3 * rows
    left = torch.randn(3, size, generator=generator, dtype=torch.float64)
    right = torch.randn(5, size, generator=generator, dtype=torch.float64)
    low_rank = fisher.damped_products(left, right, damping)
    dense = fisher.damped_products(left, right, damping, method="dense")
    matrix = fisher.dense()
    direct = left @ torch.linalg.inv(matrix + damping * torch.eye(size, dtype=torch.float64)) @ right.T
    assert torch.linalg.matrix_rank(matrix) == 2 * rows
    # both solves are backward stable: they agree to the forward error bound, ε·cond(F + δI)
    condition = torch.linalg.cond(matrix + damping * torch.eye(size, dtype=torch.float64)).item()
    rtol = 20 * torch.finfo(torch.float64).eps * condition
    atol = rtol * direct.abs().max().item()
    assert rtol < 1e-7
    torch.testing.assert_close(low_rank, dense, rtol=rtol, atol=atol)
    torch.testing.assert_close(low_rank, direct, rtol=rtol, atol=atol)


def test_low_rank_and_dense_paths_agree_through_exact_pairwise():
    torch.manual_seed(9)
    model = prepare_model(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double(), FixedNoiseTask())
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    train, query = (
        single_example_batches(TensorDataset(x[:4], y[:4])),
        single_example_batches(TensorDataset(x[4:], y[4:])),
    )
    for p in tracked_parameters(model):
        p.requires_grad_(True)
    fishers = fisher_blocks(model, FixedNoiseTask(), tracked_blocks(model), train)
    assert all(fisher.low_rank for fisher in fishers.values())  # 4 examples, blocks of 16 and 10
    for damping in (1e-4, None):
        automatic, _ = exact_pairwise(model, FixedNoiseTask(), train, query, damping)
        dense, _ = exact_pairwise(model, FixedNoiseTask(), train, query, damping, method="dense")
        torch.testing.assert_close(automatic, dense, rtol=1e-9, atol=0)


def test_rows_fold_into_a_dense_matrix_once_they_reach_the_block_size():
    generator = torch.Generator().manual_seed(10)
    draws = torch.randn(9, 4, generator=generator, dtype=torch.float64)
    fisher = BlockFisher(4)
    for row in draws:
        fisher.add_example([row])
    assert not fisher.low_rank and len(fisher.rows) < 4
    torch.testing.assert_close(fisher.dense(), draws.T @ draws / 9, **TIGHT)
    assert fisher.trace() == pytest.approx(float((draws**2).sum()) / 9, rel=1e-12)
    with pytest.raises(ValueError, match="dense"):
        fisher.damped_products(draws[:1], draws[:2], 0.1, method="low_rank")


def test_zero_damping_with_a_rank_deficient_fisher_is_refused():
    fisher = BlockFisher(5)
    fisher.add_example([torch.ones(5, dtype=torch.float64)])
    with pytest.raises(ValueError, match="singular"):
        fisher.damped_products(torch.ones(1, 5, dtype=torch.float64), torch.ones(1, 5, dtype=torch.float64), 0.0)


# ------------------------------------------------------------------------------------ side effects


def test_requires_grad_flags_are_restored_afterwards():
    model, train, query = regression_setup(seed=11)
    params = tracked_parameters(model)
    flags = [True, False, False, True]
    for p, flag in zip(params, flags, strict=True):
        p.requires_grad_(flag)
    exact_pairwise(model, FixedNoiseTask(), single_example_batches(train), single_example_batches(query), 0.1)
    assert [p.requires_grad for p in params] == flags


def test_prepared_model_parameters_stay_frozen_and_gradients_untouched():
    model, train, query = regression_setup(seed=12)
    params = tracked_parameters(model)
    assert not any(p.requires_grad for p in params)  # prepare_model froze them
    before = [p.detach().clone() for p in params]
    exact_pairwise(model, FixedNoiseTask(), single_example_batches(train), single_example_batches(query), 0.1)
    assert not any(p.requires_grad for p in params)
    assert all(p.grad is None for p in params)  # autograd.grad, not backward: nothing accumulated
    for p, old in zip(params, before, strict=True):
        assert torch.equal(p.detach(), old)


def test_flags_are_restored_when_the_solve_is_refused():
    model, train, query = regression_setup(seed=13, n_train=2)
    with pytest.raises(ValueError, match="singular"):
        exact_pairwise(model, FixedNoiseTask(), single_example_batches(train), single_example_batches(query), 0.0)
    assert not any(p.requires_grad for p in tracked_parameters(model))


def test_single_example_batches_collate_like_a_dataloader():
    x, y = torch.arange(12.0).reshape(4, 3), torch.arange(4)
    batches = single_example_batches(TensorDataset(x, y))
    assert len(batches) == 4
    assert batches[2][0].shape == (1, 3) and torch.equal(batches[2][0][0], x[2])
    assert batches[2][1].shape == (1,) and int(batches[2][1]) == 2
    assert len(single_example_batches(TensorDataset(x, y), count=2)) == 2
    assert len(single_example_batches(TensorDataset(x, y), count=10)) == 4


# ----------------------------------------------------------------------------- against real kronfluence

FLOAT64 = torch.float64
EXACT_AGREEMENT = {"rtol": 1e-8, "atol": 0}


@pytest.fixture(scope="module")
def kronfluence_single_example(tmp_path_factory):
    """Real EK-FAC on one training example (its Fisher per module is exactly a aᵀ ⊗ g gᵀ), all in float64."""
    torch.manual_seed(14)
    task = FixedNoiseTask()
    model = prepare_model(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double(), task)
    x, y = torch.randn(6, 3, dtype=FLOAT64), torch.randn(6, 2, dtype=FLOAT64)
    train, query = TensorDataset(x[:1], y[:1]), TensorDataset(x[1:], y[1:])
    analyzer = Analyzer(
        analysis_name="exact",
        model=model,
        task=task,
        cpu=True,
        disable_tqdm=True,
        log_level=logging.WARNING,
        output_dir=str(tmp_path_factory.mktemp("kronfluence")),
    )
    factor_args = FactorArguments(
        strategy="ekfac",
        activation_covariance_dtype=FLOAT64,
        gradient_covariance_dtype=FLOAT64,
        eigendecomposition_dtype=FLOAT64,
        per_sample_gradient_dtype=FLOAT64,
        lambda_dtype=FLOAT64,
    )
    analyzer.fit_all_factors("ekfac", dataset=train, per_device_batch_size=1, factor_args=factor_args)
    scores = {}
    for damping in (1e-3, None):
        score_args = ScoreArguments(
            damping_factor=damping,
            per_sample_gradient_dtype=FLOAT64,
            precondition_dtype=FLOAT64,
            score_dtype=FLOAT64,
        )
        name = f"pairwise_{damping}"
        analyzer.compute_pairwise_scores(
            name,
            factors_name="ekfac",
            query_dataset=query,
            train_dataset=train,
            per_device_query_batch_size=5,
            per_device_train_batch_size=1,
            score_args=score_args,
        )
        scores[damping] = analyzer.load_pairwise_scores(name)
    return SimpleNamespace(
        model=model, task=task, train=train, query=query, scores=scores, factors=analyzer.load_all_factors("ekfac")
    )


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("damping", [1e-3, None])
def test_exact_matches_kronfluence_ekfac_on_a_single_training_example(kronfluence_single_example, damping):
    run = kronfluence_single_example
    expected = run.scores[damping]["all_modules"]
    exact, dampings = exact_pairwise(
        run.model, run.task, single_example_batches(run.train), single_example_batches(run.query), damping
    )
    assert expected.dtype == FLOAT64 and expected.shape == exact.shape == (5, 1)
    assert bool((expected.abs() > 1e-3).all())  # not trivially agreeing zeros
    torch.testing.assert_close(exact, expected, **EXACT_AGREEMENT)
    # per module damping: the explicit value, or 0.1 × the mean of kronfluence's own Λ_m
    lambdas, counts = run.factors["lambda_matrix"], run.factors["num_lambda_processed"]
    for name, delta in dampings.items():
        kronfluence_delta = 0.1 * (lambdas[name] / counts[name]).mean().item() if damping is None else damping
        assert delta == pytest.approx(kronfluence_delta, rel=1e-12), name


@pytest.mark.filterwarnings("ignore")
def test_the_agreement_above_would_catch_the_wrong_scale_or_a_shared_damping(kronfluence_single_example):
    """Half the Fisher (the Gauss-Newton scale of a summed squared error with N(0,1) sampled targets) gives
    g(F/2 + δI)⁻¹g = 2·g(F + 2δI)⁻¹g; one damping shared by all modules replaces each δ_m. Neither is rounding."""
    run = kronfluence_single_example
    batches = single_example_batches(run.train), single_example_batches(run.query)
    half_fisher, _ = exact_pairwise(run.model, run.task, *batches, 2e-3)
    assert not torch.allclose(2 * half_fisher, run.scores[1e-3]["all_modules"], rtol=1e-3)
    _, dampings = exact_pairwise(run.model, run.task, *batches, None)
    shared, _ = exact_pairwise(run.model, run.task, *batches, sum(dampings.values()) / len(dampings))
    assert not torch.allclose(shared, run.scores[None]["all_modules"], rtol=1e-3)


@pytest.mark.filterwarnings("ignore")
def test_exact_fidelity_reports_agreement_and_per_module_damping(kronfluence_single_example):
    source = kronfluence_single_example
    run = SimpleNamespace(
        model=source.model,
        pipeline=SimpleNamespace(task=source.task, collate=None),
        train_subset=source.train,
        query_subset=source.query,
        factor_args=FactorArguments(strategy="ekfac"),
        score_args=ScoreArguments(damping_factor=None),
        artifacts={"pairwise_scores": source.scores[None]},
        stages={"pairwise_scores": SimpleNamespace(completed=True)},
    )
    result = exact_fidelity(run)
    assert set(result) == {"parameters", "damping", "train_examples_compared", "spearman", "pearson", "finite"}
    assert result["parameters"] == 16 + 10
    assert set(result["damping"]) == {"0", "2"}
    assert result["train_examples_compared"] == 1
    assert result["spearman"] == pytest.approx(1.0) and result["pearson"] == pytest.approx(1.0, abs=1e-12)
    assert result["finite"] is True

    run.stages = {"pairwise_scores": SimpleNamespace(completed=False)}
    assert exact_fidelity(run) == {"skipped": "no pairwise scores to compare"}
    run.model = None
    assert exact_fidelity(run) == {"skipped": "no model"}
    run.model = prepare_model(nn.Sequential(nn.Linear(200, 100)).double(), source.task)
    assert "above the" in exact_fidelity(run)["skipped"] and MAX_PARAMETERS < 200 * 100 + 100
