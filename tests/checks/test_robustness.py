"""SPEC §12: checks never crash on any tensor (NaN, inf, subnormal, empty, 1×1, huge), proven with hypothesis.

Every public check and measure is fed tensors of every float dtype and awkward shape; each must return,
and every Finding it returns must be a valid record.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from influence_doctor.checks import measures
from influence_doctor.checks.conditioning import check_damped_spectrum
from influence_doctor.checks.covariance import check_covariance_sum, check_examples_processed
from influence_doctor.checks.eigendecomposition import check_eigenpairs
from influence_doctor.checks.lambda_matrix import check_lambda
from influence_doctor.checks.outcome import CheckOutcome
from influence_doctor.checks.scores import check_module_dominance, check_scores
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.checks.train import check_loss_curve, check_parameters, detrend
from tests.checks.helpers import assert_valid

T = Thresholds()
SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SPECIAL = (
    math.nan,
    math.inf,
    -math.inf,
    0.0,
    -0.0,
    5e-324,  # float64 subnormal
    1e-40,  # float32 subnormal
    6e-8,  # float16 subnormal
    65504.0,  # float16 max
    65520.0,  # rounds to inf in float16
    3.4e38,
    1.7e308,
    -1.7e308,
    1.0,
    -1.0,
)
elements = st.one_of(st.sampled_from(SPECIAL), st.floats(allow_nan=True, allow_infinity=True))
dtypes = st.sampled_from(FLOAT_DTYPES)
sizes = st.integers(min_value=0, max_value=8)


def _tensor(values: list[float], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    with np.errstate(over="ignore", invalid="ignore"):
        array = np.array(values, dtype=np.float64).reshape(shape)
    return torch.tensor(array).to(dtype)


@st.composite
def tensors(draw, shape=None, dtype=None) -> torch.Tensor:
    if shape is None:
        shape = draw(
            st.one_of(
                st.just(()),
                st.tuples(sizes),
                sizes.map(lambda n: (n, n)),
                st.tuples(sizes, sizes),
                st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
            )
        )
    dtype = dtype if dtype is not None else draw(dtypes)
    count = int(np.prod(shape, dtype=np.int64))
    values = draw(st.lists(elements, min_size=count, max_size=count))
    return _tensor(values, shape, dtype)


@st.composite
def square(draw, dtype=None) -> torch.Tensor:
    n = draw(sizes)
    return draw(tensors(shape=(n, n), dtype=dtype))


def _ok(outcome: CheckOutcome) -> None:
    assert isinstance(outcome, CheckOutcome)
    assert isinstance(outcome.metrics, dict)
    assert_valid(outcome.findings)


counts = st.one_of(st.integers(-3, 1000), st.floats(allow_nan=True, allow_infinity=True))
optional_floats = st.one_of(st.none(), elements)


# --- checks -------------------------------------------------------------------------------------


@SETTINGS
@given(matrix=st.one_of(square(), tensors()), count=counts)
def test_check_covariance_sum_never_raises(matrix, count):
    _ok(check_covariance_sum(matrix, count, "m/activation_covariance", T))


@SETTINGS
@given(
    activation=st.dictionaries(st.sampled_from(["a", "b", "c"]), counts, max_size=3),
    gradient=st.dictionaries(st.sampled_from(["a", "b", "c"]), counts, max_size=3),
)
def test_check_examples_processed_never_raises(activation, gradient):
    _ok(check_examples_processed(activation, gradient))


@st.composite
def eigenpairs(draw):
    """(values, vectors, covariance) with consistent shapes half the time, and otherwise shapes drawn from
    the same two sizes so that near-misses (non-square Q with a same-shaped C, transposes) are frequent."""
    a, b = draw(sizes), draw(sizes)
    if draw(st.booleans()):
        values_shape, vectors_shape, covariance_shape = (a,), (a, a), (a, a)
    else:
        vectors_shape = draw(st.sampled_from([(a, b), (b, a), (a,), (a, b, 1)]))
        values_shape = draw(st.sampled_from([(a,), (b,), (a, b), ()]))
        covariance_shape = draw(st.sampled_from([(a, b), (b, a), (a, a), (b,)]))
    values = draw(tensors(shape=values_shape))
    vectors = draw(tensors(shape=vectors_shape))
    covariance = draw(st.one_of(st.none(), tensors(shape=covariance_shape)))
    return values, vectors, covariance


@SETTINGS
@given(
    pairs=eigenpairs(),
    compute=dtypes,
    source=st.one_of(st.none(), dtypes),
    precondition=dtypes,
)
def test_check_eigenpairs_never_raises(pairs, compute, source, precondition):
    values, vectors, covariance = pairs
    _ok(
        check_eigenpairs(
            values,
            vectors,
            "m/activation_eigenvectors",
            T,
            compute_dtype=compute,
            source_dtype=source,
            precondition_dtype=precondition,
            covariance=covariance,
        )
    )


@SETTINGS
@given(
    lambda_sum=tensors(),
    count=counts,
    damping=optional_floats,
    precondition=dtypes,
    low_precision=st.booleans(),
)
def test_check_lambda_never_raises(lambda_sum, count, damping, precondition, low_precision):
    _ok(
        check_lambda(
            lambda_sum,
            count,
            "m/lambda_matrix",
            T,
            damping_factor=damping,
            precondition_dtype=precondition,
            low_precision_inputs=low_precision,
        )
    )


@SETTINGS
@given(
    smallest=elements,
    largest=elements,
    mean=elements,
    damping=optional_floats,
    precondition=dtypes,
    stage=st.sampled_from(["lambda", "eigendecomposition"]),
)
def test_check_damped_spectrum_never_raises(smallest, largest, mean, damping, precondition, stage):
    outcome = check_damped_spectrum(smallest, largest, mean, damping, precondition, "m", stage, T)
    _ok(outcome)
    assert all(f.check in (f"{stage}.condition", f"{stage}.damping_floor") for f in outcome.findings)


@SETTINGS
@given(scores=tensors(), kind=st.sampled_from(["pairwise", "self"]), overflow=st.booleans())
def test_check_scores_never_raises(scores, kind, overflow):
    outcome = check_scores(f"{kind}_scores", kind, scores, T, overflow_prone=overflow)
    _ok(outcome)
    assert 0.0 <= outcome.metrics["finite_fraction"] <= 1.0


@SETTINGS
@given(per_module=st.dictionaries(st.sampled_from(["fc1", "fc2", "fc3", "all_modules"]), tensors(), max_size=4))
def test_check_module_dominance_never_raises(per_module):
    outcome = check_module_dominance("pairwise_scores", per_module, T)
    _ok(outcome)
    share = outcome.metrics.get("dominant_share")
    assert share is None or math.isnan(share) or 0.0 <= share <= 1.0 + 1e-12


@SETTINGS
@given(
    loss=st.lists(elements, max_size=60),
    validation=st.lists(optional_floats, max_size=10),
    span=st.integers(-2, 30),
)
def test_check_loss_curve_never_raises(loss, validation, span):
    _ok(check_loss_curve(loss, validation, T))
    assert len(detrend(loss)) == len(loss)


@SETTINGS
@given(params=st.dictionaries(st.sampled_from(["w", "b", "fc.weight"]), tensors(), max_size=3))
def test_check_parameters_never_raises(params):
    outcome = check_parameters(params)
    _ok(outcome)
    assert outcome.metrics["nonfinite_parameters"] == sum(measures.nonfinite_count(t) for t in params.values())


# --- measures -----------------------------------------------------------------------------------


@SETTINGS
@given(t=tensors(), other=tensors(), tolerance=st.floats(0, 1e6))
def test_measures_on_any_tensor_return_plain_numbers(t, other, tolerance):
    count = measures.nonfinite_count(t)
    assert count == int((~torch.isfinite(t)).sum())
    position = measures.first_nonfinite_position(t)
    if count == 0:
        assert position is None
    else:
        assert not math.isfinite(float(t[position]))
        flat = int(np.ravel_multi_index(position, t.shape)) if t.ndim else 0
        assert bool(torch.isfinite(t.flatten()[:flat]).all())
    assert measures.max_abs_finite(t) >= 0.0
    for value in (
        measures.relative_frobenius(t, other),
        measures.symmetry_error(t),
        measures.orthogonality_error(t),
        measures.robust_z_max(t),
        *measures.spectrum_extremes(t),
    ):
        assert isinstance(value, float)
    assert 0 <= measures.dead_rows(t, tolerance) <= (t.shape[0] if t.ndim == 2 else 0)
    assert 0 <= measures.effective_rank(t, tolerance, t.dtype) <= t.numel()


@SETTINGS
@given(n=sizes, data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_reconstruction_error_on_square_eigenpairs_of_any_content(n, data, seed):
    vectors = data.draw(tensors(shape=(n, n)))
    values = data.draw(tensors(shape=(n,)))
    matrix = data.draw(tensors(shape=(n, n)))
    assert isinstance(measures.reconstruction_error(vectors, values, matrix, seed=seed), float)


@SETTINGS
@given(pairs=eigenpairs())
def test_reconstruction_error_on_mismatched_shapes(pairs):
    values, vectors, covariance = pairs
    matrix = torch.zeros(vectors.shape) if covariance is None else covariance
    assert isinstance(measures.reconstruction_error(vectors, values, matrix), float)


@SETTINGS
@given(smallest=elements, largest=elements, damping=elements)
def test_damped_condition_of_any_floats(smallest, largest, damping):
    value = measures.damped_condition(smallest, largest, damping)
    assert isinstance(value, float)
    if not any(math.isnan(x) for x in (smallest, largest, damping)) and smallest + damping <= 0.0:
        assert value == math.inf


@SETTINGS
@given(m=square(dtype=torch.float64))
def test_symmetric_part_has_zero_symmetry_error(m):
    finite = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).clamp(-1e300, 1e300)
    symmetric = finite + finite.T  # exactly symmetric: addition commutes
    error = measures.symmetry_error(symmetric)
    assert error == 0.0 or (m.numel() == 0 and math.isnan(error))
