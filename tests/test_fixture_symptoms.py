"""Every pathological fixture really exhibits its pathology, measured on the artifacts the run keeps.

These tests hold the fixtures to their word (the symptom is real, not assumed) and the healthy control
to the opposite, using the same measurements; what the doctor concludes is tested elsewhere.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator
from itertools import pairwise

import pytest
import torch

from fixtures import FIXTURES, load_fixture
from influence_doctor import STAGES, Pipeline, diagnose
from influence_doctor.doctor import Report
from influence_doctor.findings import CAUSES
from tests.pipelines import small_pipeline

FP16_MAX = torch.finfo(torch.float16).max
COVARIANCES = ("activation_covariance", "gradient_covariance")
COUNTS = {
    "activation_covariance": "num_activation_covariance_processed",
    "gradient_covariance": "num_gradient_covariance_processed",
}

_REPORTS: dict[str, Report] = {}


@pytest.fixture(scope="module")
def run_case(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Report]]:
    """Run each case once per module (`fix=False`: the pathology as configured) and reuse the report.

    kronfluence calls `gc.collect()` around every stage; with torch's few hundred thousand objects in
    the heap each call costs ~0.2 s, most of a small run. Freezing what exists before each run (imports,
    pytest, earlier reports) makes those collections cheap; each run's own garbage is still collected.
    """
    gc.collect()
    gc.freeze()

    def run(name: str) -> Report:
        if name not in _REPORTS:
            pipeline, _expected = load_fixture(name) if name in FIXTURES else (small_pipeline(), None)
            out_dir = tmp_path_factory.mktemp(name)
            gc.freeze()
            _REPORTS[name] = diagnose(pipeline, fix=False, out_dir=out_dir, progress=False)
        return _REPORTS[name]

    yield run
    _REPORTS.clear()
    gc.unfreeze()


# --- measurements -----------------------------------------------------------------------------------


def covariances(report: Report) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(factor, module, stored covariance sum) for every tracked module."""
    artifact = report.run.artifacts["covariance"]
    for factor in COVARIANCES:
        for module, tensor in artifact[factor].items():
            yield factor, module, tensor


def normalised(report: Report, factor: str, module: str) -> torch.Tensor:
    """The covariance as the eigendecomposition sees it: float64, divided by the examples seen."""
    artifact = report.run.artifacts["covariance"]
    matrix = artifact[factor][module].double() / float(artifact[COUNTS[factor]][module].item())
    return (matrix + matrix.T) / 2


def effective_rank(matrix: torch.Tensor, stored_dtype: torch.dtype) -> int:
    """Eigenvalues above d·eps·λmax, eps of the dtype the matrix was stored in; below is rounding noise."""
    eigenvalues = torch.linalg.eigvalsh(matrix.double())
    floor = len(eigenvalues) * torch.finfo(stored_dtype).eps * eigenvalues.max()
    return int((eigenvalues > floor).sum().item())


def zero_rows(matrix: torch.Tensor) -> int:
    return int((matrix == 0).all(dim=1).sum().item())


def orthogonality_error(vectors: torch.Tensor) -> float:
    """‖QᵀQ − I‖_F, computed in float64 on the vectors exactly as stored."""
    q = vectors.double()
    return torch.linalg.matrix_norm(q.T @ q - torch.eye(q.shape[1], dtype=torch.float64)).item()


def robust_outlier(scores: torch.Tensor) -> float:
    """How many MADs the most extreme finite score lies from the median."""
    finite = scores[torch.isfinite(scores)].double()
    median = finite.median()
    mad = (finite - median).abs().median()
    return ((finite - median).abs().max() / mad).item()


def pairwise_scores(report: Report) -> torch.Tensor:
    return report.run.artifacts["pairwise_scores"]["all_modules"]


def oscillation(loss: list[float], alpha: float = 0.25) -> tuple[float, float]:
    """(share of direction reversals, peak-to-peak / mean) of the EMA-smoothed loss over its last half."""
    smoothed: list[float] = []
    for value in loss:
        smoothed.append(value if not smoothed else alpha * value + (1 - alpha) * smoothed[-1])
    tail = smoothed[len(smoothed) // 2 :]
    steps = [b - a for a, b in pairwise(tail)]
    reversals = sum((a > 0) != (b > 0) for a, b in pairwise(steps))
    amplitude = (max(tail) - min(tail)) / (sum(tail) / len(tail))
    return reversals / max(len(steps) - 1, 1), amplitude


def parameters_finite(report: Report) -> bool:
    return all(torch.isfinite(p).all().item() for p in report.run.model.parameters())


def inputs(report: Report) -> torch.Tensor:
    """The training inputs the run analysed, stacked."""
    return torch.stack([report.run.train_subset[i][0] for i in range(len(report.run.train_subset))])


# --- the harness itself -----------------------------------------------------------------------------


def test_every_fixture_declares_a_valid_expected_diagnosis() -> None:
    assert set(FIXTURES) == {
        "fp16_covariance_overflow",
        "fp16_score_overflow",
        "rank_deficient_inputs",
        "dead_relu",
        "tiny_damping_ood_queries",
        "diverging_training",
        "oscillating_training",
        "amp_fp16",
        "eigenvectors_fp16",
    }
    names = set()
    for name, target in FIXTURES.items():
        assert target == f"fixtures.{name}:{name}"
        pipeline, expected = load_fixture(name)
        assert isinstance(pipeline, Pipeline)
        names.add(pipeline.name)
        assert set(expected) == {"cause", "stage", "rung"}, name
        assert expected["cause"] in CAUSES, name
        assert expected["stage"] in STAGES, name
        assert expected["rung"] is None or (isinstance(expected["rung"], str) and expected["rung"]), name
        if expected["cause"] in ("nonfinite-model", "training-diverged", "training-oscillating"):
            assert expected["rung"] is None, f"{name}: no factor setting heals a broken model"
    assert len(names) == len(FIXTURES), "pipeline names must be unique: they name report folders"
    with pytest.raises(KeyError, match="unknown fixture"):
        load_fixture("no_such_case")


# --- one symptom per case ---------------------------------------------------------------------------


def test_fp16_covariance_overflow_puts_inf_in_the_float16_sum(run_case) -> None:
    report = run_case("fp16_covariance_overflow")
    activation = report.run.artifacts["covariance"]["activation_covariance"]["0"]
    assert activation.dtype == torch.float16
    assert torch.isinf(activation).any()
    # The inputs are finite; their exact sum of squares is what float16 cannot hold.
    x = inputs(report).double()
    assert torch.isfinite(x).all()
    assert (x.T @ x).diagonal().min() > FP16_MAX
    assert parameters_finite(report) and all(math.isfinite(v) for v in report.run.monitor.loss)


def test_fp16_score_overflow_makes_scores_inf_from_finite_float32_factors(run_case) -> None:
    report = run_case("fp16_score_overflow")
    for _factor, _module, tensor in covariances(report):
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all()
    for per_module in report.run.artifacts["lambda"]["lambda_matrix"].values():
        assert torch.isfinite(per_module).all()
    scores = pairwise_scores(report)
    assert scores.dtype == torch.float16
    nonfinite = (~torch.isfinite(scores)).float().mean().item()
    assert nonfinite > 0.1  # measured: ~38% of pairwise scores
    assert torch.isinf(scores).any()
    assert not torch.isfinite(report.run.artifacts["self_scores"]["all_modules"]).all()
    assert report.document["scores"]["pairwise"]["finite_fraction"] < 0.9


def test_rank_deficient_inputs_leave_the_activation_covariance_at_rank_four(run_case) -> None:
    report = run_case("rank_deficient_inputs")
    assert report.run.factor_args.strategy == "kfac" and report.run.score_args.damping_factor == 1e-8
    matrix = normalised(report, "activation_covariance", "0")
    assert matrix.shape == (17, 17)
    assert effective_rank(matrix, torch.float32) <= 4  # 3 latent signals + the bias column
    eigenvalues = report.run.artifacts["eigendecomposition"]["activation_eigenvalues"]["0"]
    # What remains below the floor is rounding noise of either sign, far below the damping's reach.
    assert eigenvalues.double().abs().sort().values[:13].max() < 1e-5 * eigenvalues.double().max()


def test_dead_relu_units_give_zero_rows(run_case) -> None:
    report = run_case("dead_relu")
    activation = report.run.artifacts["covariance"]["activation_covariance"]["2"]
    gradient = report.run.artifacts["covariance"]["gradient_covariance"]["0"]
    assert activation.shape == (33, 33) and zero_rows(activation) == 24
    assert gradient.shape == (32, 32) and zero_rows(gradient) == 24
    assert effective_rank(normalised(report, "activation_covariance", "2"), torch.float32) <= 9
    # EK-FAC's refitted eigenvalues are exactly zero along the dead units: only the damping remains.
    lambda_next = report.run.artifacts["lambda"]["lambda_matrix"]["2"]
    assert int((lambda_next == 0).sum().item()) >= 24
    assert parameters_finite(report)


def test_tiny_damping_on_ood_queries_gives_score_outliers_from_full_rank_factors(run_case) -> None:
    report = run_case("tiny_damping_ood_queries")
    assert report.run.score_args.damping_factor == 1e-8
    for factor, module, tensor in covariances(report):
        matrix = normalised(report, factor, module)
        assert effective_rank(matrix, tensor.dtype) == matrix.shape[0], (factor, module)
    scores = pairwise_scores(report)
    assert torch.isfinite(scores).all()
    assert robust_outlier(scores) > 1000  # measured: ~1600 MADs
    # The outliers belong to the two out-of-distribution queries (the last two rows).
    worst_query = int(scores.abs().max(dim=1).values.argmax().item())
    assert worst_query >= 6
    in_distribution = scores[:6].abs().max().item()
    assert scores[6:].abs().max().item() > 30 * in_distribution  # measured: ~70×


def test_diverging_training_ends_with_inf_loss_and_nan_weights(run_case) -> None:
    report = run_case("diverging_training")
    loss = report.run.monitor.loss
    assert math.isfinite(loss[0])
    assert any(math.isinf(v) for v in loss) and math.isnan(loss[-1])
    nan_share = torch.cat([torch.isnan(p).flatten() for p in report.run.model.parameters()]).float().mean()
    assert nan_share > 0.9


def test_oscillating_training_swings_without_converging_and_stays_finite(run_case) -> None:
    report = run_case("oscillating_training")
    loss = report.run.monitor.loss
    assert all(math.isfinite(v) for v in loss)
    reversals, amplitude = oscillation(loss)
    assert reversals > 0.9  # measured: every step reverses
    assert amplitude > 0.2  # measured: 0.25 of the level, after smoothing
    tail = loss[len(loss) // 2 :]
    assert min(max(a, b) / min(a, b) for a, b in pairwise(tail)) > 10  # measured: 16× on every step
    window = len(loss) // 10
    assert sum(loss[-window:]) >= 0.9 * sum(loss[:window])  # no progress at all
    assert max(loss) < 2 * max(loss[:window])  # bounded: not a divergence
    assert parameters_finite(report)


def test_amp_fp16_overflows_the_forward_pass(run_case) -> None:
    report = run_case("amp_fp16")
    assert report.run.factor_args.amp_dtype == torch.float16
    covariance = report.run.artifacts["covariance"]
    # Stored in float32, yet the gradients that fed them were already inf/NaN under autocast.
    for module, tensor in covariance["gradient_covariance"].items():
        assert tensor.dtype == torch.float32 and not torch.isfinite(tensor).all(), module
    assert torch.isfinite(covariance["activation_covariance"]["0"]).all()
    assert parameters_finite(report)
    # The float32 model's outputs are finite but beyond float16's range.
    with torch.no_grad():
        outputs = report.run.model(inputs(report).float())
    assert torch.isfinite(outputs).all() and outputs.abs().min() > FP16_MAX


def test_eigenvectors_stored_in_fp16_lose_orthogonality(run_case) -> None:
    report = run_case("eigenvectors_fp16")
    assert report.run.factor_args.eigendecomposition_dtype == torch.float64
    for factor, module, tensor in covariances(report):
        assert tensor.dtype == torch.float16
        assert torch.isfinite(tensor).all() and tensor.abs().max() < FP16_MAX / 16, (factor, module)
    eigen = report.run.artifacts["eigendecomposition"]
    for factor in ("activation", "gradient"):
        for module, vectors in eigen[f"{factor}_eigenvectors"].items():
            if vectors.shape[0] < 2:
                continue
            assert vectors.dtype == torch.float16
            assert orthogonality_error(vectors) > 1e-4, (factor, module)
            # Computed in float64 from the same covariance, the basis is orthonormal to rounding.
            exact = torch.linalg.eigh(normalised(report, f"{factor}_covariance", module)).eigenvectors
            assert orthogonality_error(exact) < 1e-12


# --- the healthy control ----------------------------------------------------------------------------


def test_healthy_control_shows_none_of_these_symptoms(run_case) -> None:
    report = run_case("small")
    loss = report.run.monitor.loss
    assert all(math.isfinite(v) for v in loss) and loss[-1] < loss[0]
    reversals, amplitude = oscillation(loss)
    assert reversals < 0.5 or amplitude < 0.2
    assert parameters_finite(report)
    for factor, module, tensor in covariances(report):
        assert torch.isfinite(tensor).all() and tensor.abs().max() < FP16_MAX, (factor, module)
        assert zero_rows(tensor) == 0, (factor, module)
        matrix = normalised(report, factor, module)
        assert effective_rank(matrix, tensor.dtype) == matrix.shape[0], (factor, module)
    for name, vectors in report.run.artifacts["eigendecomposition"].items():
        if name.endswith("eigenvectors"):
            for module, q in vectors.items():
                assert orthogonality_error(q) < 1e-5, (name, module)
    for kind in ("pairwise_scores", "self_scores"):
        scores = report.run.artifacts[kind]["all_modules"]
        assert torch.isfinite(scores).all()
        assert robust_outlier(scores) < 1000, kind  # heavy tails are normal; thousands of MADs are not
