"""The prescription (ready-to-paste Python) and the fidelity of a fix (agreement with less-regularized scores)."""

from __future__ import annotations

import ast
import math

import pytest
import torch
from kronfluence.arguments import FactorArguments, ScoreArguments
from scipy import stats

from influence_doctor.fidelity import compare_scores, fidelity_against_least_regularized, pearson
from influence_doctor.prescription import FACTOR_DEFAULTS_NOTE, prescribe
from influence_doctor.remedies.heal import Snapshot


def evaluate(python: str) -> list:
    """Execute the prescription as a user would paste it, collecting the value of every bare expression."""
    import kronfluence

    tree = ast.parse(python)
    namespace = {"torch": torch, "kronfluence": kronfluence}
    values = []
    for node in tree.body:
        if isinstance(node, ast.Expr):
            values.append(eval(compile(ast.Expression(node.value), "<prescription>", "eval"), namespace))
        else:
            exec(compile(ast.Module([node], type_ignores=[]), "<prescription>", "exec"), namespace)
    return values


# ----------------------------------------------------------------------------------------- prescription


def test_prescription_lists_only_changed_fields_and_its_python_rebuilds_the_final_arguments():
    fa0, sa0 = FactorArguments(), ScoreArguments()
    fa = FactorArguments(
        strategy="kfac",
        activation_covariance_dtype=torch.float64,
        amp_dtype=None,
        eigendecomposition_dtype=torch.float64,
    )
    sa = ScoreArguments(damping_factor=None, score_dtype=torch.bfloat16, module_partitions=2)
    result = prescribe(fa0, sa0, fa, sa)
    assert result["factor_args"] == {"strategy": "kfac", "activation_covariance_dtype": "float64"}
    assert result["score_args"] == {"damping_factor": None, "score_dtype": "bfloat16", "module_partitions": 2}
    assert result["batch_size"] is None
    python = result["python"]
    assert FACTOR_DEFAULTS_NOTE in python
    assert "eigendecomposition_dtype" not in python and "amp_dtype" not in python
    exec(python, {})  # pastes and runs on its own
    built = evaluate(python)
    assert [type(v) for v in built] == [FactorArguments, ScoreArguments]
    assert vars(built[0]) == vars(fa)
    assert vars(built[1]) == vars(sa)


def test_prescription_with_non_default_originals_changes_only_what_moved():
    fa0 = FactorArguments(strategy="kfac", covariance_module_partitions=3)
    sa0 = ScoreArguments(damping_factor=1e-8, data_partitions=4)
    fa = FactorArguments(strategy="kfac", covariance_module_partitions=3, gradient_covariance_dtype=torch.float64)
    sa = ScoreArguments(damping_factor=0.0123456789, data_partitions=4)
    result = prescribe(fa0, sa0, fa, sa)
    assert result["factor_args"] == {"gradient_covariance_dtype": "float64"}
    assert result["score_args"] == {"damping_factor": 0.0123456789}
    built_fa, built_sa = evaluate(result["python"])
    assert built_fa.gradient_covariance_dtype is torch.float64
    assert built_sa.damping_factor == 0.0123456789  # the float round-trips exactly
    assert "covariance_module_partitions" not in result["python"] and "data_partitions" not in result["python"]


def test_prescription_with_only_score_changes_builds_only_score_arguments():
    result = prescribe(FactorArguments(), ScoreArguments(), FactorArguments(), ScoreArguments(damping_factor=None))
    assert result["factor_args"] == {}
    built = evaluate(result["python"])
    assert len(built) == 1 and isinstance(built[0], ScoreArguments) and built[0].damping_factor is None
    assert "FactorArguments(" not in result["python"].split(FACTOR_DEFAULTS_NOTE)[1]


def test_no_prescription_text_when_nothing_changed():
    result = prescribe(FactorArguments(), ScoreArguments(), FactorArguments(), ScoreArguments())
    assert result == {"factor_args": {}, "score_args": {}, "batch_size": None, "python": ""}


def test_batch_size_change_alone_is_prescribed_as_a_comment():
    result = prescribe(FactorArguments(), ScoreArguments(), FactorArguments(), ScoreArguments(), (8, 4))
    assert result["batch_size"] == 4
    assert "batch size of 4 (was 8)" in result["python"]
    assert evaluate(result["python"]) == []  # still valid Python, nothing but imports and comments


def test_prescription_json_side_is_plain():
    result = prescribe(
        FactorArguments(), ScoreArguments(), FactorArguments(amp_dtype=torch.bfloat16), ScoreArguments(), (16, 8)
    )
    assert result["factor_args"] == {"amp_dtype": "bfloat16"}
    assert result["batch_size"] == 8
    assert evaluate(result["python"])[0].amp_dtype is torch.bfloat16


# ---------------------------------------------------------------------------------------------- pearson


def test_pearson_matches_scipy():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 7, generator=g)
    b = 0.5 * a + torch.randn(4, 7, generator=g)
    expected = stats.pearsonr(a.double().flatten().numpy(), b.double().flatten().numpy()).statistic
    assert pearson(a, b) == pytest.approx(expected, rel=1e-12)
    assert pearson(a, -3 * a + 1) == pytest.approx(-1.0, abs=1e-12)


def test_pearson_ignores_pairs_with_a_nonfinite_side():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(20, generator=g, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64)
    a[3], b[7], a[11] = float("inf"), float("nan"), float("-inf")
    keep = torch.ones(20, dtype=torch.bool)
    keep[[3, 7, 11]] = False
    expected = stats.pearsonr(a[keep].numpy(), b[keep].numpy()).statistic
    assert pearson(a, b) == pytest.approx(expected, rel=1e-12)


def test_pearson_of_different_shapes_is_nan():
    assert math.isnan(pearson(torch.arange(6.0), torch.arange(5.0)))


def test_pearson_undefined_cases_are_nan():
    assert math.isnan(pearson(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0])))  # too few
    assert math.isnan(pearson(torch.ones(5), torch.arange(5.0)))  # constant
    assert math.isnan(pearson(torch.tensor([1.0, 2.0, float("nan"), 4.0]), torch.tensor([1.0, float("inf"), 3.0, 4.0])))


def test_compare_scores_only_kinds_in_both():
    g = torch.Generator().manual_seed(2)
    final = {"pairwise": torch.randn(3, 5, generator=g), "self": torch.randn(5, generator=g)}
    reference = {"pairwise": final["pairwise"] + 0.3 * torch.randn(3, 5, generator=g), "other": torch.randn(5)}
    result = compare_scores(final, reference)
    assert set(result) == {"pairwise"}
    x, y = final["pairwise"].double().flatten().numpy(), reference["pairwise"].double().flatten().numpy()
    assert result["pairwise"]["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic, rel=1e-12)
    assert result["pairwise"]["pearson"] == pytest.approx(stats.pearsonr(x, y).statistic, rel=1e-12)


# --------------------------------------------------------------------------------- least-regularized fidelity


def snap(label, scores, finite=True, damping=1e-8):
    return Snapshot(label, scores, finite, {"damping_factor": damping, "covariance_shift": None, "strategy": "ekfac"})


def scores_like(base, noise, seed):
    g = torch.Generator().manual_seed(seed)
    return {"pairwise": base + noise * torch.randn(base.shape, generator=g, dtype=base.dtype)}


BASE = torch.randn(4, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def test_reference_is_the_earliest_finite_earlier_snapshot():
    nonfinite = snap("as configured", {"pairwise": torch.full((4, 10), float("nan"))}, finite=False)
    first_finite = snap("after damping:heuristic", scores_like(BASE, 0.5, 4), damping=None)
    second_finite = snap("after damping:heuristic-x10", scores_like(BASE, 0.01, 5), damping=0.3)
    final = snap("after strategy:kfac", {"pairwise": BASE.clone()}, damping=0.3)
    result = fidelity_against_least_regularized([nonfinite, first_finite, second_finite, final], 0.5)
    assert result["reference"] == "after damping:heuristic"
    assert result["reference_regularization"] == first_finite.regularization
    assert result["final_regularization"] == final.regularization
    x, y = BASE.flatten().numpy(), first_finite.scores["pairwise"].flatten().numpy()
    expected = stats.spearmanr(x, y).statistic
    assert result["agreement"]["pairwise"]["spearman"] == pytest.approx(expected, rel=1e-12)
    assert result["agreement"]["pairwise"]["pearson"] == pytest.approx(stats.pearsonr(x, y).statistic, rel=1e-12)
    assert result["min_spearman"] == pytest.approx(expected, rel=1e-12)
    # against the later (closer) snapshot the agreement would have been higher: it was not used
    assert stats.spearmanr(x, second_finite.scores["pairwise"].flatten().numpy()).statistic > expected


def test_the_configuration_as_given_is_the_reference_when_it_was_finite():
    given = snap("as configured", scores_like(BASE, 0.2, 6))
    final = snap("after shift:1e-6", {"pairwise": BASE.clone()})
    result = fidelity_against_least_regularized([given, final], 0.9)
    assert result["reference"] == "as configured"


def test_min_spearman_is_the_worst_kind():
    g = torch.Generator().manual_seed(7)
    self_scores = torch.randn(10, generator=g, dtype=torch.float64)
    reference = snap(
        "as configured", {"pairwise": BASE.clone(), "self": torch.randn(10, generator=g, dtype=torch.float64)}
    )
    final = snap("after x", {"pairwise": BASE.clone(), "self": self_scores})
    result = fidelity_against_least_regularized([reference, final], 0.5)
    assert result["agreement"]["pairwise"]["spearman"] == pytest.approx(1.0)
    assert result["min_spearman"] == pytest.approx(result["agreement"]["self"]["spearman"])
    assert result["min_spearman"] < 1.0


@pytest.mark.parametrize(
    ("snapshots", "reason"),
    [
        ([snap("as configured", {"pairwise": BASE})], "no remedy was applied"),
        ([], "no remedy was applied"),
        (
            [snap("as configured", {"pairwise": BASE}), snap("after x", {"pairwise": BASE * math.inf}, finite=False)],
            "the final configuration's scores are not finite or not trustworthy",
        ),
        (
            [
                snap("as configured", {"pairwise": BASE * math.nan}, finite=False),
                snap("after a", {}, finite=False),
                snap("after b", {"pairwise": BASE}),
            ],
            "nothing finite to compare to",
        ),
    ],
)
def test_reasons_when_there_is_nothing_to_compare(snapshots, reason):
    result = fidelity_against_least_regularized(snapshots, 0.5)
    assert result["reference"] is None
    assert reason in result["reason"]
    assert "agreement" not in result and "below_limit" not in result


def test_below_limit_flips_at_the_limit():
    reference = snap("as configured", scores_like(BASE, 0.7, 8))
    final = snap("after y", {"pairwise": BASE.clone()})
    rho = fidelity_against_least_regularized([reference, final], 0.0)["min_spearman"]
    assert 0.0 < rho < 1.0
    at = fidelity_against_least_regularized([reference, final], rho)
    assert at["limit"] == rho and at["below_limit"] is False  # equal to the limit is not below it
    above = fidelity_against_least_regularized([reference, final], math.nextafter(rho, 1.0))
    assert above["below_limit"] is True
    below = fidelity_against_least_regularized([reference, final], math.nextafter(rho, 0.0))
    assert below["below_limit"] is False


def test_undefined_agreement_is_not_reported_below_the_limit():
    reference = snap("as configured", {"pairwise": torch.ones(4, 10, dtype=torch.float64)})
    final = snap("after z", {"pairwise": BASE.clone()})
    result = fidelity_against_least_regularized([reference, final], 0.5)
    assert math.isnan(result["min_spearman"])
    assert result["below_limit"] is False
