"""The prescription (ready-to-paste Python) and the fidelity of a fix (per-query rankings against its reference)."""

from __future__ import annotations

import ast
import math

import pytest
import torch
from kronfluence.arguments import FactorArguments, ScoreArguments
from scipy import stats

from influence_doctor.fidelity import FLOAT64_REFERENCE, compare_scores, fix_fidelity, pearson
from influence_doctor.remedies.heal import Snapshot
from influence_doctor.report.prescription import FACTOR_DEFAULTS_NOTE, prescribe


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


def per_query_spearman(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [stats.spearmanr(x.numpy(), y.numpy()).statistic for x, y in zip(a, b, strict=True)]


def test_compare_scores_only_kinds_in_both_and_per_query():
    g = torch.Generator().manual_seed(2)
    final = {"pairwise": torch.randn(3, 25, generator=g), "self": torch.randn(5, generator=g)}
    reference = {"pairwise": final["pairwise"] + 0.8 * torch.randn(3, 25, generator=g), "other": torch.randn(5)}
    result = compare_scores(final, reference)
    assert set(result) == {"pairwise"}
    rows = per_query_spearman(final["pairwise"].double(), reference["pairwise"].double())
    assert result["pairwise"]["median_spearman"] == pytest.approx(sorted(rows)[1], rel=1e-12)
    assert result["pairwise"]["worst_spearman"] == pytest.approx(min(rows), rel=1e-12)
    x, y = final["pairwise"].double().flatten().numpy(), reference["pairwise"].double().flatten().numpy()
    assert result["pairwise"]["pearson"] == pytest.approx(stats.pearsonr(x, y).statistic, rel=1e-12)


# ------------------------------------------------------------------------------------------ fix fidelity


def snap(label, scores, finite=True, damping=1e-8, strategy="ekfac"):
    regularization = {"damping_factor": damping, "covariance_shift": None, "strategy": strategy}
    return Snapshot(label, scores, finite, regularization)


class FakeTrial:
    """A lab trial's interface as fix_fidelity reads it: scores per kind on a subsample."""

    def __init__(self, label, scores, examples=25, queries=4):
        self.label, self._scores, self.examples, self.queries = label, scores, examples, queries

    def scores(self, kind):
        return self._scores.get(kind)


def scores_like(base, noise, seed):
    g = torch.Generator().manual_seed(seed)
    return {"pairwise": base + noise * torch.randn(base.shape, generator=g, dtype=base.dtype)}


BASE = torch.randn(4, 25, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def test_reference_is_the_earliest_trusted_earlier_snapshot():
    nonfinite = snap("as configured", {"pairwise": torch.full((4, 25), float("nan"))}, finite=False)
    first_finite = snap("after damping:heuristic", scores_like(BASE, 0.5, 4), damping=None)
    second_finite = snap("after damping:heuristic-x10", scores_like(BASE, 0.01, 5), damping=0.3)
    final = snap("after strategy:kfac", {"pairwise": BASE.clone()}, damping=0.3)
    result = fix_fidelity([nonfinite, first_finite, second_finite, final], 0.5)
    assert result["reference"] == "after damping:heuristic"
    assert result["reference_kind"] == "least-regularized finite run"
    assert result["reference_regularization"] == first_finite.regularization
    assert result["final_regularization"] == final.regularization
    rows = per_query_spearman(BASE, first_finite.scores["pairwise"])
    assert result["median_spearman"] == pytest.approx(statistics_median(rows), rel=1e-12)
    assert result["worst_spearman"] == pytest.approx(min(rows), rel=1e-12)
    assert (result["examples"], result["queries"]) == (25, 4)
    # against the later (closer) snapshot the agreement would have been higher: it was not used
    closer = per_query_spearman(BASE, second_finite.scores["pairwise"])
    assert min(closer) > result["worst_spearman"]


def test_the_configuration_as_given_is_the_reference_when_it_was_trusted():
    given = snap("as configured", scores_like(BASE, 0.2, 6))
    final = snap("after shift:1e-6", {"pairwise": BASE.clone()})
    result = fix_fidelity([given, final], 0.9)
    assert result["reference"] == "as configured" and result["method_changed"] is False


def test_float64_as_configured_is_the_reference_when_nothing_earlier_was_trusted():
    """The reference always exists: with no trusted earlier run, the probe's float64 of the configuration
    as given, read per query (median, worst, top overlap) on the examples and queries it was measured on."""
    nonfinite = snap("as configured", {"pairwise": BASE * math.inf}, finite=False)
    final = snap("after dtype:float32", {"pairwise": BASE.clone()})
    reference = FakeTrial("float64 end to end, same damping", {"pairwise": BASE.clone()})
    candidate = FakeTrial("candidate", scores_like(BASE, 0.9, 11))
    result = fix_fidelity([nonfinite, final], 0.9, (candidate, reference), ("pairwise",))
    assert result["reference"] == FLOAT64_REFERENCE and result["reference_kind"] == "float64"
    rows = per_query_spearman(candidate.scores("pairwise"), BASE)
    assert result["worst_spearman"] == pytest.approx(min(rows), rel=1e-12)
    assert result["median_spearman"] == pytest.approx(statistics_median(rows), rel=1e-12)
    assert 0.0 <= result["top_overlap"] <= 1.0
    assert (result["examples"], result["queries"]) == (25, 4)
    assert result["below_limit"] is (result["median_spearman"] < 0.9)


def statistics_median(values):
    import statistics

    return statistics.median(values)


def test_a_strategy_change_is_said_plainly():
    nonfinite = snap("as configured", {"pairwise": BASE * math.nan}, finite=False)
    final = snap("after strategy:diagonal", {"pairwise": BASE.clone()}, strategy="diagonal")
    pair = (FakeTrial("c", {"pairwise": BASE.clone()}), FakeTrial("r", {"pairwise": BASE.clone()}))
    assert fix_fidelity([nonfinite, final], 0.9, pair)["method_changed"] is True


def test_headline_is_the_worst_kind():
    g = torch.Generator().manual_seed(7)
    reference = snap(
        "as configured", {"pairwise": BASE.clone(), "self": torch.randn(25, generator=g, dtype=torch.float64)}
    )
    final = snap("after x", {"pairwise": BASE.clone(), "self": torch.randn(25, generator=g, dtype=torch.float64)})
    result = fix_fidelity([reference, final], 0.5)
    assert result["agreement"]["pairwise"]["median_spearman"] == pytest.approx(1.0)
    assert result["median_spearman"] == pytest.approx(result["agreement"]["self"]["median_spearman"])
    assert result["kind"] == "self" and result["median_spearman"] < 1.0


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
            "no float64 reference could be computed",
        ),
    ],
)
def test_reasons_when_there_is_nothing_to_compare(snapshots, reason):
    result = fix_fidelity(snapshots, 0.5)
    assert result["reference"] is None
    assert reason in result["reason"]
    assert "agreement" not in result and "below_limit" not in result


def test_below_limit_flips_at_the_limit():
    reference = snap("as configured", scores_like(BASE, 0.7, 8))
    final = snap("after y", {"pairwise": BASE.clone()})
    rho = fix_fidelity([reference, final], 0.0)["median_spearman"]
    assert 0.0 < rho < 1.0
    at = fix_fidelity([reference, final], rho)
    assert at["limit"] == rho and at["below_limit"] is False  # equal to the limit is not below it
    above = fix_fidelity([reference, final], math.nextafter(rho, 1.0))
    assert above["below_limit"] is True
    below = fix_fidelity([reference, final], math.nextafter(rho, 0.0))
    assert below["below_limit"] is False


def test_an_unmeasured_agreement_is_never_a_pass():
    """A reference with no ranking (constant scores): the fix's fidelity is NaN, and NaN is held below the
    bar (issue: the bar was skipped when fidelity was NaN)."""
    reference = snap("as configured", {"pairwise": torch.ones(4, 25, dtype=torch.float64)})
    final = snap("after z", {"pairwise": BASE.clone()})
    result = fix_fidelity([reference, final], 0.5)
    assert math.isnan(result["median_spearman"])
    assert result["below_limit"] is True and not result.get("undefined_reference")


def test_a_reference_without_finite_influence_is_undefined_not_a_failed_measurement():
    """float64 of the configuration as given is inf/NaN (zero damping on a flat direction): there is no
    distortion to measure, said as `undefined_reference`, and that alone does not fail the bar."""
    reference = snap("as configured", {"pairwise": torch.full((4, 25), math.nan, dtype=torch.float64)})
    final = snap("after z", {"pairwise": BASE.clone()})
    result = fix_fidelity([reference, final], 0.5)
    assert math.isnan(result["median_spearman"]) and result["undefined_reference"] is True
    assert result["below_limit"] is False


def test_the_gate_fails_an_applied_fix_it_could_not_measure():
    from influence_doctor.config import Gates
    from influence_doctor.gates import _fix_fidelity

    unmeasured = {"fidelity": {"fix": {"reference": "float64 as configured", "median_spearman": math.nan}}}
    assert _fix_fidelity(unmeasured, Gates()).passed is False
    undefined = {"fidelity": {"fix": {"reference": "float64 as configured", "undefined_reference": True}}}
    assert _fix_fidelity(undefined, Gates()).passed is True
    assert _fix_fidelity({"fidelity": {}}, Gates()).passed is True  # no fix at all: nothing to hold
