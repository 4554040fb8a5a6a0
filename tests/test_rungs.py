"""Rungs (what each rung changes), ladders (in which order) and doctored covariances (how a shift is written)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.factor.covariance import covariance_matrices_exist, load_covariance_matrices
from safetensors.torch import load_file

from influence_doctor.causes import STRATEGY_FALLBACK, default_ladders, ladder_for
from influence_doctor.causes import TAGS as CAUSES
from influence_doctor.changes import Facts, plan
from influence_doctor.checks.spectra import damping_reference_points, module_damping, rounding_floors, scaled_damping
from influence_doctor.configuration import Arguments, Configuration
from influence_doctor.diagnosis import Problem
from influence_doctor.findings import Finding
from influence_doctor.runner.doctored import doctor_covariances, shifted, write_factors

FP16, BF16, FP32, FP64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


def finding(stage, cause, subject="", severity="fail"):
    return Finding(f"{stage}.probe", stage, subject, severity, 1.0, 0.0, cause, "measured")


def problem(cause, stage, subjects=(), evidence=None, setting=None):
    evidence = [finding(stage, cause, s) for s in subjects or [""]] if evidence is None else evidence
    return Problem(cause, stage, list(subjects), evidence=evidence, message=f"{cause} in {stage}", setting=setting)


class Settings:
    """A configuration and what a change reads besides it (the measured damping reference points)."""

    def __init__(self, configuration, facts):
        self.configuration, self.facts = configuration, facts

    factor_args = property(lambda self: self.configuration.factor_args)
    score_args = property(lambda self: self.configuration.score_args)
    batch_size = property(lambda self: self.configuration.batch_size)


def settings(fa=None, sa=None, batch_size=8, score_stage="pairwise_scores", heuristic=None, floor=None):
    configuration = Configuration(
        Arguments.of(fa if fa is not None else FactorArguments()),
        Arguments.of(sa if sa is not None else ScoreArguments()),
        batch_size,
        4,
    )
    kinds = ("pairwise", "self") if score_stage == "pairwise_scores" else ("self",)
    return Settings(configuration, Facts(kinds, heuristic, floor))


def fields(arguments):
    return arguments.as_dict() if hasattr(arguments, "as_dict") else vars(arguments)


def diff(before, after):
    """Fields that differ between two argument values: name → (old, new)."""
    a, b = fields(before), fields(after)
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def planned(rung, prob, s):
    """Plan, and check on the way that the configuration it started from is untouched (it is immutable)."""
    before = s.configuration
    change, reason = plan(rung, prob, s.configuration, s.facts)
    assert s.configuration == before and hash(s.configuration) == hash(before)
    if change is not None:
        assert change.before is before
        assert reason == ""
        assert change.rung == rung
    else:
        assert reason
    return change, reason


# --------------------------------------------------------------------------------------------- dtype


def test_dtype_rung_raises_only_the_group_the_experiment_convicted():
    fa = FactorArguments(activation_covariance_dtype=FP16, gradient_covariance_dtype=FP16, lambda_dtype=FP16)
    s = settings(fa, ScoreArguments(score_dtype=FP16))
    change, _ = planned("dtype:float32", problem("fp16-overflow", "covariance", setting="covariance"), s)
    assert diff(s.factor_args, change.factor_args) == {
        "activation_covariance_dtype": (FP16, FP32),
        "gradient_covariance_dtype": (FP16, FP32),
    }
    assert change.factor_args.lambda_dtype == FP16  # another group's field: kept
    assert diff(s.score_args, change.score_args) == {}
    assert change.first_stage == "covariance"
    assert change.shift is None and change.batch_size is None


def test_dtype_rung_without_a_setting_raises_every_group_feeding_the_stage_but_never_lowers_one():
    fa = FactorArguments(activation_covariance_dtype=BF16, gradient_covariance_dtype=FP64, lambda_dtype=FP16)
    s = settings(fa, ScoreArguments(score_dtype=FP16))
    change, _ = planned("dtype:float32", problem(None, "lambda"), s)
    assert diff(s.factor_args, change.factor_args) == {
        "activation_covariance_dtype": (BF16, FP32),
        "lambda_dtype": (FP16, FP32),
    }
    assert change.factor_args.gradient_covariance_dtype == FP64  # above the target: kept
    assert change.score_args.score_dtype == FP16  # the score stage is downstream of lambda: kept
    assert change.first_stage == "covariance"


def test_dtype_rung_with_nothing_below_the_target_does_not_apply():
    s = settings(FactorArguments(activation_covariance_dtype=FP32, gradient_covariance_dtype=FP64))
    change, reason = planned("dtype:float32", problem("fp16-overflow", "covariance", setting="covariance"), s)
    assert change is None
    assert "covariance" in reason and "float32" in reason


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_bf16_covariances_are_known_not_to_heal(strategy):
    """kronfluence stores eigenvectors in the covariance dtype: bf16 leaves them drifting."""
    s = settings(FactorArguments(strategy=strategy, activation_covariance_dtype=FP16))
    change, reason = planned("dtype:bfloat16", problem("fp16-overflow", "covariance", setting="covariance"), s)
    assert change is None and "known not to heal" in reason and "eigenvectors" in reason


def test_bf16_rung_turns_fp16_autocast_into_bf16():
    s = settings(FactorArguments(amp_dtype=FP16))
    change, _ = planned("dtype:bfloat16", problem("fp16-overflow", "covariance", setting="amp"), s)
    assert diff(s.factor_args, change.factor_args) == {"amp_dtype": (FP16, BF16)}
    assert change.changes == {"factor_args.amp_dtype": (FP16, BF16)}
    assert change.first_stage == "covariance"


@pytest.mark.parametrize("amp", [FP16, BF16])
def test_fp32_rung_turns_autocast_off(amp):
    s = settings(FactorArguments(amp_dtype=amp))
    change, _ = planned("dtype:float32", problem("fp16-overflow", "covariance", setting="amp"), s)
    assert change.factor_args.amp_dtype is None
    assert change.changes == {"factor_args.amp_dtype": (amp, None)}


def test_bf16_rung_leaves_bf16_autocast_alone():
    s = settings(FactorArguments(amp_dtype=BF16))
    change, _ = planned("dtype:bfloat16", problem("fp16-overflow", "covariance", setting="amp"), s)
    assert change is None


def test_lambda_dtype_rung_restarts_at_lambda():
    fa = FactorArguments(lambda_dtype=FP16, per_sample_gradient_dtype=FP16)
    s = settings(fa)
    change, _ = planned("dtype:float32", problem("fp16-overflow", "lambda", setting="lambda"), s)
    assert diff(s.factor_args, change.factor_args) == {
        "lambda_dtype": (FP16, FP32),
        "per_sample_gradient_dtype": (FP16, FP32),
    }
    assert change.first_stage == "lambda"


def test_autocast_restarts_at_covariance():
    """FactorArguments.amp_dtype also drives the covariance pass, so it must be recomputed."""
    s = settings(FactorArguments(amp_dtype=FP16))
    change, _ = planned("dtype:float32", problem("fp16-overflow", "lambda", setting="amp"), s)
    assert change.changes == {"factor_args.amp_dtype": (FP16, None)}
    assert change.first_stage == "covariance"


@pytest.mark.parametrize("score_stage", ["pairwise_scores", "self_scores"])
def test_score_dtype_rung_edits_score_arguments_and_restarts_at_the_score_stage(score_stage):
    sa = ScoreArguments(score_dtype=FP16, precondition_dtype=BF16, amp_dtype=FP16)
    s = settings(sa=sa, score_stage=score_stage)
    change, _ = planned("dtype:float32", problem("fp16-overflow", score_stage, setting="scores"), s)
    assert diff(s.score_args, change.score_args) == {"score_dtype": (FP16, FP32), "precondition_dtype": (BF16, FP32)}
    assert diff(s.factor_args, change.factor_args) == {}
    assert change.first_stage == score_stage
    change, _ = planned("dtype:float32", problem("fp16-overflow", score_stage, setting="score_amp"), s)
    assert diff(s.score_args, change.score_args) == {"amp_dtype": (FP16, None)}


def test_dtype_rungs_climb_in_order_and_stop():
    s = settings(sa=ScoreArguments(score_dtype=FP16))
    prob = problem("fp16-overflow", "pairwise_scores", setting="scores")
    seen = []
    for rung in ("dtype:bfloat16", "dtype:float32", "dtype:float64"):
        change, _ = planned(rung, prob, s)
        seen.append(change.score_args.score_dtype)
        s = settings(change.factor_args, change.score_args)
    assert seen == [BF16, FP32, FP64]
    assert planned("dtype:float64", prob, s)[0] is None


# ------------------------------------------------------------------------- eigendecomposition / covariance


def test_eigendecomposition_dtype_rung():
    s = settings(FactorArguments(eigendecomposition_dtype=FP32))
    change, _ = planned(
        "eigendecomposition-dtype:float64", problem("eigendecomposition-failed", "eigendecomposition"), s
    )
    assert diff(s.factor_args, change.factor_args) == {"eigendecomposition_dtype": (FP32, FP64)}
    assert change.first_stage == "eigendecomposition"
    change, reason = planned(
        "eigendecomposition-dtype:float64", problem("eigendecomposition-failed", "eigendecomposition"), settings()
    )
    assert change is None and "float64" in reason


def test_covariance_dtype_rungs():
    s = settings(FactorArguments(activation_covariance_dtype=BF16, gradient_covariance_dtype=FP32))
    prob = problem("eigendecomposition-inaccurate", "eigendecomposition")
    change, _ = planned("covariance-dtype:float32", prob, s)
    assert diff(s.factor_args, change.factor_args) == {"activation_covariance_dtype": (BF16, FP32)}
    assert change.first_stage == "covariance"
    change, _ = planned("covariance-dtype:float64", prob, s)
    assert diff(s.factor_args, change.factor_args) == {
        "activation_covariance_dtype": (BF16, FP64),
        "gradient_covariance_dtype": (FP32, FP64),
    }
    s64 = settings(FactorArguments(activation_covariance_dtype=FP64, gradient_covariance_dtype=FP64))
    assert planned("covariance-dtype:float64", prob, s64)[0] is None
    assert planned("covariance-dtype:float32", prob, s64)[0] is None


# ---------------------------------------------------------------------------------------------- damping


def test_damping_heuristic_sets_none():
    s = settings(sa=ScoreArguments(damping_factor=1e-8), score_stage="self_scores")
    change, _ = planned("damping:heuristic", problem("tiny-damping", "self_scores"), s)
    assert change.score_args.damping_factor is None
    assert diff(s.score_args, change.score_args) == {"damping_factor": (1e-8, None)}
    assert change.changes == {"score_args.damping_factor": (1e-8, None)}
    assert change.first_stage == "self_scores"
    assert diff(s.factor_args, change.factor_args) == {}


def test_damping_heuristic_is_not_applicable_when_already_the_heuristic():
    change, reason = planned(
        "damping:heuristic",
        problem("tiny-damping", "pairwise_scores"),
        settings(sa=ScoreArguments(damping_factor=None)),
    )
    assert change is None and "heuristic" in reason


@pytest.mark.parametrize("current", [None, 1e-8, 0.2])
def test_damping_x10_is_ten_times_the_measured_heuristic(current):
    s = settings(sa=ScoreArguments(damping_factor=current), heuristic=0.03)
    change, _ = planned("damping:heuristic-x10", problem("tiny-damping", "pairwise_scores"), s)
    assert change.score_args.damping_factor == pytest.approx(0.3, rel=1e-12)
    assert change.changes["score_args.damping_factor"][0] == current
    assert change.first_stage == "pairwise_scores"


@pytest.mark.parametrize(("rung", "expected"), [("damping:floor", 1e-7), ("damping:floor-x100", 1e-5)])
@pytest.mark.parametrize("current", [0.0, 1e-9])
def test_damping_floor_rungs_start_from_the_rounding_floor(rung, expected, current):
    s = settings(sa=ScoreArguments(damping_factor=current), floor=1e-7)
    change, _ = planned(rung, problem("tiny-damping", "pairwise_scores"), s)
    assert change.score_args.damping_factor == pytest.approx(expected, rel=1e-12)
    assert change.changes == {"score_args.damping_factor": (current, change.score_args.damping_factor)}


@pytest.mark.parametrize("value", [None, float("nan"), float("inf"), 0.0, -1.0])
@pytest.mark.parametrize("rung", ["damping:heuristic-x10", "damping:floor", "damping:floor-x100"])
def test_measured_damping_rungs_need_a_finite_positive_measurement(rung, value):
    s = settings(sa=ScoreArguments(damping_factor=None), heuristic=value, floor=value)
    change, reason = planned(rung, problem("tiny-damping", "pairwise_scores"), s)
    assert change is None and "no finite" in reason


def test_damping_rungs_never_lower_a_larger_damping():
    for current in (0.3, 5.0):
        s = settings(sa=ScoreArguments(damping_factor=current), heuristic=0.03, floor=1e-3)
        for rung in ("damping:heuristic-x10", "damping:floor", "damping:floor-x100"):
            assert planned(rung, problem("tiny-damping", "pairwise_scores"), s)[0] is None


# ------------------------------------------------------------------------------------------------ shift


@pytest.mark.parametrize(("rung", "expected"), [("shift:1e-4", ("mean", 1e-4)), ("shift-trace:0.2", ("trace", 0.2))])
def test_shift_applies_to_kfac_whatever_the_evidence(rung, expected):
    s = settings(FactorArguments(strategy="kfac"))
    prob = problem("ill-conditioned", "pairwise_scores", evidence=[finding("pairwise_scores", "ill-conditioned")])
    change, _ = planned(rung, prob, s)
    assert change.shift == expected
    assert change.first_stage == "eigendecomposition"
    assert diff(s.factor_args, change.factor_args) == {} and diff(s.score_args, change.score_args) == {}
    assert list(change.changes) == ["covariance.diagonal_shift"]


@pytest.mark.parametrize("stage", ["covariance", "eigendecomposition"])
def test_shift_applies_to_ekfac_when_a_fail_sits_in_the_covariance_spectrum(stage):
    evidence = [finding("lambda", "ill-conditioned", severity="fail"), finding(stage, "ill-conditioned")]
    change, _ = planned("shift:1e-6", problem("ill-conditioned", "lambda", evidence=evidence), settings())
    assert change.shift == ("mean", 1e-6)


def test_shift_does_not_apply_to_ekfac_when_only_lambda_fails():
    evidence = [
        finding("lambda", "ill-conditioned", severity="fail"),
        finding("covariance", "ill-conditioned", severity="warn"),  # a warning is not a failure to heal
    ]
    change, reason = planned("shift:1e-6", problem("ill-conditioned", "lambda", evidence=evidence), settings())
    assert change is None and "EK-FAC" in reason


@pytest.mark.parametrize("strategy", ["diagonal", "identity"])
def test_shift_does_not_apply_without_covariances(strategy):
    s = settings(FactorArguments(strategy=strategy))
    change, reason = planned("shift:1e-2", problem("not-psd", "covariance"), s)
    assert change is None and strategy in reason


# --------------------------------------------------------------------------------------------- strategy


def test_strategy_rungs_go_ekfac_kfac_diagonal_identity_and_never_back_up():
    prob = problem("ill-conditioned", "pairwise_scores")
    s = settings()
    path = [s.factor_args.strategy]
    for rung in STRATEGY_FALLBACK:
        change, _ = planned(rung, prob, s)
        assert change.first_stage == "covariance"
        assert diff(s.factor_args, change.factor_args) == {"strategy": (path[-1], rung.split(":")[1])}
        path.append(change.factor_args.strategy)
        s = settings(change.factor_args, change.score_args)
    assert path == ["ekfac", "kfac", "diagonal", "identity"]
    for rung in ("strategy:ekfac", *STRATEGY_FALLBACK):
        assert planned(rung, prob, s)[0] is None


@pytest.mark.parametrize(
    ("current", "rung"), [("kfac", "strategy:kfac"), ("kfac", "strategy:ekfac"), ("diagonal", "strategy:kfac")]
)
def test_strategy_rung_never_climbs_back(current, rung):
    change, reason = planned(rung, problem(None, "pairwise_scores"), settings(FactorArguments(strategy=current)))
    assert change is None and current in reason


def test_strategy_rung_may_skip_a_step_down():
    s = settings(FactorArguments(strategy="ekfac"))
    change, _ = planned("strategy:diagonal", problem(None, "lambda"), s)
    assert change.factor_args.strategy == "diagonal"


# ----------------------------------------------------------------------------------------------- memory


def test_partitions_double():
    fa = FactorArguments(covariance_module_partitions=2, lambda_module_partitions=1)
    sa = ScoreArguments(module_partitions=3)
    s = settings(fa, sa)
    change, _ = planned("partitions:x2", problem("out-of-memory", "lambda"), s)
    assert diff(s.factor_args, change.factor_args) == {
        "covariance_module_partitions": (2, 4),
        "lambda_module_partitions": (1, 2),
    }
    assert diff(s.score_args, change.score_args) == {"module_partitions": (3, 6)}
    assert change.first_stage == "covariance"  # the covariance's partitions double too: it is computed again


@pytest.mark.parametrize(("size", "half"), [(8, 4), (5, 2), (2, 1)])
def test_batch_halves(size, half):
    change, _ = planned("batch:half", problem("out-of-memory", "covariance"), settings(batch_size=size))
    assert change.batch_size == half
    assert change.changes == {"batch_size": (size, half)}
    assert change.first_stage == "covariance"


def test_batch_of_one_cannot_halve():
    change, reason = planned("batch:half", problem("out-of-memory", "covariance"), settings(batch_size=1))
    assert change is None and "1" in reason


def test_offload_and_iterative_lambda_flags():
    s = settings()
    change, _ = planned("offload:on", problem("out-of-memory", "pairwise_scores"), s)
    assert diff(s.factor_args, change.factor_args) == {"offload_activations_to_cpu": (False, True)}
    assert diff(s.score_args, change.score_args) == {"offload_activations_to_cpu": (False, True)}
    assert (
        planned(
            "offload:on", problem("out-of-memory", "pairwise_scores"), settings(change.factor_args, change.score_args)
        )[0]
        is None
    )
    change, _ = planned("iterative-lambda:on", problem("out-of-memory", "lambda"), s)
    assert diff(s.factor_args, change.factor_args) == {"use_iterative_lambda_aggregation": (False, True)}
    assert change.first_stage == "lambda"


def test_unknown_rung_kind():
    change, reason = plan("teleport:now", problem("tiny-damping", "pairwise_scores"), settings().configuration)
    assert change is None and "teleport" in reason


# ------------------------------------------------------------------------------------------------ ladders


def test_every_default_rung_is_a_known_kind_and_every_cause_is_a_known_tag():
    for cause in default_ladders():
        assert cause in CAUSES
        for rung in ladder_for(cause):
            s = settings()
            _, reason = plan(rung, problem(cause, "covariance"), s.configuration, s.facts)
            assert "unknown rung kind" not in reason


@pytest.mark.parametrize(
    ("cause", "head"),
    [
        ("fp16-overflow", ("dtype:bfloat16", "dtype:float32", "dtype:float64")),
        ("low-precision-loss", ("dtype:bfloat16", "dtype:float32", "dtype:float64")),
        (
            "eigendecomposition-failed",
            ("eigendecomposition-dtype:float64", "covariance-dtype:float32", "covariance-dtype:float64", "shift:1e-6"),
        ),
        (
            "eigendecomposition-inaccurate",
            ("eigendecomposition-dtype:float64", "covariance-dtype:float32", "covariance-dtype:float64", "shift:1e-6"),
        ),
        ("ill-conditioned", ("shift:1e-6", "shift:1e-4", "shift:1e-2", "shift:0.1", "shift-trace:0.2")),
        ("rank-deficient", ("shift:1e-6", "shift:1e-4", "shift:1e-2", "shift:0.1", "shift-trace:0.2")),
        ("not-psd", ("shift:1e-6", "shift:1e-4", "shift:1e-2", "shift:0.1", "shift-trace:0.2")),
        ("tiny-damping", ("damping:floor", "damping:floor-x100", "damping:heuristic", "damping:heuristic-x10")),
        ("out-of-memory", ("partitions:x2", "offload:on", "iterative-lambda:on", "batch:half")),
    ],
)
def test_default_ladders_follow_the_spec(cause, head):
    ladder = ladder_for(cause)
    assert ladder[: len(head)] == head
    assert ladder[-len(STRATEGY_FALLBACK) :] == STRATEGY_FALLBACK
    assert len(set(ladder)) == len(ladder)


def test_shift_epsilons_grow_along_the_ladder():
    shifts = [float(r.split(":")[1]) for r in ladder_for("ill-conditioned") if r.startswith("shift:")]
    assert shifts == [1e-6, 1e-4, 1e-2, 0.1]


def test_no_cause_gets_only_the_strategy_fallback():
    assert ladder_for(None) == ("strategy:kfac", "strategy:diagonal", "strategy:identity")


@pytest.mark.parametrize(
    "cause",
    [
        "fp16-overflow",
        "low-precision-loss",
        "dtype-drift",
        "eigendecomposition-failed",
        "rank-deficient",
        "not-psd",
        "out-of-memory",
    ],
)
def test_damping_is_climbed_only_for_tiny_damping(cause):
    """Damping is the user's modeling choice: only a confirmed `tiny-damping` may change it."""
    assert not [rung for rung in ladder_for(cause) if rung.startswith("damping")]


def test_overrides_replace_a_causes_ladder_only():
    overrides = {"tiny-damping": ["damping:heuristic-x10", "strategy:diagonal"]}
    assert ladder_for("tiny-damping", overrides) == (
        "damping:heuristic-x10",
        "strategy:diagonal",
        "strategy:kfac",
        "strategy:identity",
    )
    assert ladder_for("fp16-overflow", overrides) == ladder_for("fp16-overflow")
    assert ladder_for("tiny-damping", {}) == ladder_for("tiny-damping")


# ------------------------------------------------------------------------------- damping reference points


def lambda_artifacts(means_and_counts):
    torch.manual_seed(0)
    matrices, counts = {}, {}
    for i, (mean, count) in enumerate(means_and_counts):
        m = torch.rand(3, 4, dtype=torch.float64)
        matrices[f"m{i}"] = (m / m.mean() * mean).float()
        counts[f"m{i}"] = torch.tensor([count], dtype=torch.int64)
    return {"lambda": {"lambda_matrix": matrices, "num_lambda_processed": counts}}


@pytest.mark.parametrize("strategy", ["ekfac", "diagonal"])
def test_module_damping_is_a_tenth_of_each_modules_mean_divided_lambda(strategy):
    artifacts = lambda_artifacts([(50.0, 10), (3.0, 100), (700.0, 7)])
    damping = module_damping(artifacts, strategy, None)
    assert damping == pytest.approx({"m0": 0.5, "m1": 0.003, "m2": 10.0}, rel=1e-6)
    assert module_damping(artifacts, strategy, 1e-8) == {"m0": 1e-8, "m1": 1e-8, "m2": 1e-8}


def test_module_damping_for_kfac_uses_the_eigenvalue_product():
    eigen = {
        "activation_eigenvalues": {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([10.0, 30.0])},
        "gradient_eigenvalues": {"a": torch.tensor([2.0]), "b": torch.tensor([1.0, 1.0])},
    }
    # kronfluence: 0.1·mean(kron(λ_a, λ_g)) = 0.1·mean(λ_a)·mean(λ_g): a → 0.4, b → 2.0
    assert module_damping({"eigendecomposition": eigen}, "kfac", None) == pytest.approx({"a": 0.4, "b": 2.0})
    floors = rounding_floors({"eigendecomposition": eigen}, "kfac", FP32)
    assert floors == pytest.approx({"a": 6.0 * torch.finfo(FP32).eps, "b": 30.0 * torch.finfo(FP32).eps})


def test_reference_points_take_the_module_that_needs_the_most_and_skip_nonfinite_ones():
    artifacts = lambda_artifacts([(50.0, 10), (3.0, 100), (700.0, 7)])
    artifacts["lambda"]["lambda_matrix"]["m3"] = torch.full((2, 2), float("inf"))
    artifacts["lambda"]["num_lambda_processed"]["m3"] = torch.tensor([5])
    heuristic, floor = damping_reference_points(artifacts, "ekfac", FP32)
    assert heuristic == pytest.approx(10.0, rel=1e-6)
    largest = max(
        float(m.double().max()) / float(n)
        for m, n in zip(list(artifacts["lambda"]["lambda_matrix"].values())[:3], [10, 100, 7], strict=True)
    )
    assert floor == pytest.approx(torch.finfo(FP32).eps * largest, rel=1e-6)


def test_scaled_damping_is_each_modules_own_damping_times_the_factor_from_at_least_its_floor():
    artifacts = lambda_artifacts([(50.0, 10), (3.0, 100)])
    scaled = scaled_damping(artifacts, "ekfac", None, 10.0, FP32)
    assert scaled == pytest.approx({"m0": 5.0, "m1": 0.03}, rel=1e-6)
    floors = rounding_floors(artifacts, "ekfac", FP32)
    zero = scaled_damping(artifacts, "ekfac", 0.0, 10.0, FP32)  # ten times nothing is still nothing
    assert zero == pytest.approx({module: 10.0 * floor for module, floor in floors.items()})


def test_reference_points_unknown_without_artifacts_or_for_identity():
    artifacts = lambda_artifacts([(50.0, 10)])
    assert damping_reference_points({}, "ekfac", FP32) == (None, None)
    assert damping_reference_points(artifacts, "identity", FP32) == (None, None)
    assert damping_reference_points(artifacts, "kfac", FP32) == (None, None)  # kfac reads eigenvalues


# ------------------------------------------------------------------------------------ doctored covariances


def random_covariance(n, dtype=torch.float64, seed=0, asymmetric=False):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    c = a @ a.T
    if asymmetric:
        c = c + 1e-3 * torch.randn(n, n, generator=g, dtype=torch.float64)
    return c.to(dtype)


@pytest.mark.parametrize(("mode", "epsilon"), [("mean", 1e-4), ("mean", 0.1), ("trace", 0.2)])
def test_shifted_adds_exactly_epsilon_times_mean_diag_or_trace(mode, epsilon):
    c = random_covariance(5, asymmetric=True)
    original = c.clone()
    out = shifted(c, mode, epsilon)
    assert torch.equal(c, original)  # input untouched
    symmetric = 0.5 * (c + c.T)
    diagonal = torch.diagonal(symmetric)
    amount = epsilon * (diagonal.sum() if mode == "trace" else diagonal.mean())
    torch.testing.assert_close(out - symmetric, amount * torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(out, out.T)
    assert out.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shifted_keeps_the_stored_dtype_and_symmetry(dtype):
    c = random_covariance(6, dtype=dtype, seed=1, asymmetric=True)
    out = shifted(c, "mean", 1e-2)
    assert out.dtype == dtype
    assert out.is_contiguous()
    assert torch.equal(out, out.T)
    c64 = c.double()
    expected = 0.5 * (c64 + c64.T) + 1e-2 * torch.diagonal(c64).mean() * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(out, expected.to(dtype))


def covariance_dict():
    return {
        "activation_covariance": {
            "fc1": random_covariance(3, torch.float32, 2),
            "fc2": random_covariance(4, torch.float32, 3),
        },
        "gradient_covariance": {
            "fc1": random_covariance(2, torch.float32, 4),
            "fc2": random_covariance(2, torch.float32, 5),
        },
        "num_activation_covariance_processed": {"fc1": torch.tensor([16]), "fc2": torch.tensor([16])},
        "num_gradient_covariance_processed": {"fc1": torch.tensor([16]), "fc2": torch.tensor([16])},
    }


def test_doctor_covariances_shifts_every_matrix_keeps_counts_and_mutates_nothing():
    covariance = covariance_dict()
    before = {name: {m: t.clone() for m, t in per.items()} for name, per in covariance.items()}
    doctored = doctor_covariances(covariance, "mean", 1e-2)
    for name, per in covariance.items():
        assert per.keys() == before[name].keys()
        for m, t in per.items():
            assert torch.equal(t, before[name][m])
    assert doctored.keys() == covariance.keys()
    for name in ("num_activation_covariance_processed", "num_gradient_covariance_processed"):
        assert doctored[name] is not covariance[name]
        for m in covariance[name]:
            assert torch.equal(doctored[name][m], before[name][m])
    for name in ("activation_covariance", "gradient_covariance"):
        assert doctored[name] is not covariance[name]
        for m, t in covariance[name].items():
            assert doctored[name][m].dtype == t.dtype
            shift = torch.diagonal(doctored[name][m].double() - t.double())
            torch.testing.assert_close(
                shift, torch.full_like(shift, 1e-2 * float(torch.diagonal(t.double()).mean())), rtol=1e-4, atol=1e-5
            )


def test_write_factors_writes_kronfluence_files_atomically(tmp_path):
    covariance = covariance_dict()
    doctored = doctor_covariances(covariance, "trace", 0.2)
    fa = FactorArguments(strategy="kfac", activation_covariance_dtype=torch.float64)
    directory = tmp_path / "analysis" / "factors_doctored_r1"
    write_factors(directory, doctored, fa)
    names = set(os.listdir(directory))
    assert names == {
        "activation_covariance.safetensors",
        "gradient_covariance.safetensors",
        "num_activation_covariance_processed.safetensors",
        "num_gradient_covariance_processed.safetensors",
        "factor_arguments.json",
    }
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")]
    for name, per in doctored.items():
        loaded = load_file(directory / f"{name}.safetensors")
        assert loaded.keys() == per.keys()
        for m, t in per.items():
            assert loaded[m].dtype == t.dtype and torch.equal(loaded[m], t)
    # kronfluence's own loader finds and reads them
    assert covariance_matrices_exist(directory)
    loaded = load_covariance_matrices(directory)
    assert torch.equal(loaded["gradient_covariance"]["fc2"], doctored["gradient_covariance"]["fc2"])
    assert json.loads((directory / "factor_arguments.json").read_text()) == json.loads(json.dumps(fa.to_dict()))


def test_write_factors_replaces_an_earlier_write(tmp_path):
    first = doctor_covariances(covariance_dict(), "mean", 1e-6)
    second = doctor_covariances(covariance_dict(), "mean", 0.1)
    write_factors(tmp_path, first, FactorArguments())
    write_factors(tmp_path, second, FactorArguments(strategy="kfac"))
    loaded = load_file(tmp_path / "activation_covariance.safetensors")
    assert torch.equal(loaded["fc1"], second["activation_covariance"]["fc1"])
    assert json.loads((tmp_path / "factor_arguments.json").read_text())["strategy"] == "kfac"
    assert len(os.listdir(tmp_path)) == 5


def test_scaled_damping_without_the_floor_keeps_an_explicit_damping_one_value():
    artifacts = lambda_artifacts([(50.0, 10), (3.0, 100)])
    assert scaled_damping(artifacts, "ekfac", 1e-8, 10.0, FP32, from_floor=False) == pytest.approx(
        {"m0": 1e-7, "m1": 1e-7}, rel=1e-12
    )  # one scoring pass serves every module
    floors = rounding_floors(artifacts, "ekfac", FP32)
    zero = scaled_damping(artifacts, "ekfac", 0.0, 10.0, FP32, from_floor=False)
    assert zero == pytest.approx({module: 10.0 * floor for module, floor in floors.items()})


# ------------------------------------------------------------------ the experiments' kinds of change


def ekfac_artifacts(spectra: dict[str, list[float]], count: float = 4.0) -> dict:
    """EK-FAC Λ sums as kronfluence stores them: each module's spectrum is Λ / examples processed."""
    return {
        "lambda": {
            "lambda_matrix": {m: torch.tensor(v, dtype=torch.float64) * count for m, v in spectra.items()},
            "num_lambda_processed": {m: torch.tensor([count]) for m in spectra},
        }
    }


def test_float64_end_to_end_keeps_the_damping_and_the_strategy():
    fa = FactorArguments(strategy="kfac", activation_covariance_dtype=FP16, amp_dtype=BF16)
    sa = ScoreArguments(damping_factor=1e-5, score_dtype=FP16)
    change, _ = planned("float64:end-to-end", problem("low-precision-loss", "pairwise_scores"), settings(fa, sa))
    for group in ("activation_covariance", "gradient_covariance", "eigendecomposition", "lambda"):
        assert getattr(change.factor_args, f"{group}_dtype") == FP64
    assert change.score_args.score_dtype == FP64 and change.score_args.precondition_dtype == FP64
    assert change.factor_args.amp_dtype is None and change.score_args.amp_dtype is None
    assert change.factor_args.strategy == "kfac" and change.score_args.damping_factor == 1e-5
    assert change.first_stage == "covariance" and change.method_changed is False


def test_damping_x10_scales_each_modules_heuristic_from_at_least_its_rounding_floor():
    artifacts = ekfac_artifacts({"a": [1.0, 3.0], "b": [0.0, 0.0, 1e9]})
    s = settings(sa=ScoreArguments(damping_factor=None))
    s.facts = Facts(s.facts.kinds, artifacts=artifacts)
    change, _ = planned("damping:x10", problem("tiny-damping", "pairwise_scores"), s)
    heuristic = module_damping(artifacts, "ekfac", None)
    floors = rounding_floors(artifacts, "ekfac", FP32)
    assert heuristic == pytest.approx({"a": 0.2, "b": 1e9 / 3 * 0.1})
    expected = {m: 10 * max(heuristic[m], floors[m]) for m in heuristic}
    assert change.module_damping == pytest.approx(expected, rel=1e-12)
    assert change.first_stage == "pairwise_scores" and change.score_args.damping_factor is None


def test_damping_x10_exact_keeps_an_explicit_damping_one_value():
    s = settings(sa=ScoreArguments(damping_factor=1e-3))
    s.facts = Facts(s.facts.kinds, artifacts=ekfac_artifacts({"a": [1.0, 3.0], "b": [1e-12, 5.0]}))
    change, _ = planned("damping:x10-exact", problem("tiny-damping", "self_scores"), s)
    assert change.module_damping == pytest.approx({"a": 1e-2, "b": 1e-2}, rel=1e-15)


def test_damping_x10_on_a_per_module_damping_in_force_multiplies_it():
    s = settings()
    s.configuration = s.configuration.with_(module_damping=(("a", 0.5), ("b", 2.0)))
    change, _ = planned("damping:x10", problem("tiny-damping", "pairwise_scores"), s)
    assert change.module_damping == {"a": 5.0, "b": 20.0}


def test_damping_x10_without_a_measured_spectrum_does_not_apply():
    change, reason = planned("damping:x10", problem("tiny-damping", "pairwise_scores"), settings())
    assert change is None and "spectrum" in reason


def test_a_shift_experiment_reaches_ekfac_only_through_failing_factor_stages():
    from influence_doctor.changes import Target

    ekfac = settings(FactorArguments(strategy="ekfac"))
    at_eigh = Target("eigendecomposition", "covariance", frozenset({"eigendecomposition"}))
    reaches, _ = plan("shift:1e-6", at_eigh, ekfac.configuration)
    assert reaches is not None and reaches.shift == ("mean", 1e-6)
    blocked, reason = plan("shift:1e-6", Target("lambda", "covariance", frozenset({"lambda"})), ekfac.configuration)
    assert blocked is None and "refits" in reason
    assert Target.of(problem("not-psd", "covariance")).failing_stages == frozenset({"covariance"})


def test_unknown_change_kinds_say_so():
    change, reason = plan("teleport:now", problem("fp16-overflow", "covariance"), settings().configuration)
    assert change is None and "unknown change kind 'teleport'" in reason
