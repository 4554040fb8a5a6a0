"""The frozen Configuration: kronfluence's arguments as immutable values, and stage keys that cover exactly
what each stage reads, so that every change's first stage is where the keys start to differ."""

from __future__ import annotations

import pytest
import torch
from kronfluence.arguments import FactorArguments, ScoreArguments

from influence_doctor.causes import CAUSES, STRATEGY_FALLBACK
from influence_doctor.changes import PLANNERS, Facts, Target, apply, plan
from influence_doctor.configuration import Arguments, Configuration
from influence_doctor.pipeline import STAGES

FP16 = torch.float16


def configuration(**factor_fields) -> Configuration:
    return Configuration(Arguments.of(FactorArguments(**factor_fields)), Arguments.of(ScoreArguments()), 8, 4)


def test_arguments_are_values_and_build_fresh_kronfluence_objects():
    given = ScoreArguments(damping_factor=1e-3, compute_per_token_scores=True)
    frozen = Arguments.of(given)
    built = frozen.build()
    assert type(built) is ScoreArguments and vars(built) == vars(given) and built is not given
    built.compute_per_token_scores = False  # kronfluence switches options off in what it is given
    assert frozen.compute_per_token_scores is True and frozen.build().compute_per_token_scores is True
    assert frozen.to_dict() == given.to_dict()
    assert Arguments.of(ScoreArguments(damping_factor=1e-3, compute_per_token_scores=True)) == frozen
    assert hash(Arguments.of(given)) == hash(frozen)
    assert frozen.replace(damping_factor=None).damping_factor is None and frozen.damping_factor == 1e-3
    with pytest.raises(AttributeError):
        frozen.not_a_field  # noqa: B018
    with pytest.raises(ValueError, match="no field"):
        frozen.replace(not_a_field=1)


def test_a_configuration_is_hashable_and_its_key_names_it():
    first, second = configuration(), configuration()
    assert first == second and hash(first) == hash(second) and first.key == second.key
    assert first.with_(batch_size=4).key != first.key
    assert {first: "cached"}[second] == "cached"


def keys(config: Configuration) -> dict[str, str]:
    return {stage: config.stage_key(stage) for stage in STAGES[1:]}


@pytest.mark.parametrize(
    ("edit", "first"),
    [
        (lambda c: c.with_(score_args=c.score_args.replace(damping_factor=1e-3)), "pairwise_scores"),
        (lambda c: c.with_(module_damping=(("0", 1.0),)), "pairwise_scores"),
        (lambda c: c.with_(query_batch_size=2), "pairwise_scores"),
        (lambda c: c.with_(factor_args=c.factor_args.replace(lambda_dtype=FP16)), "lambda"),
        (
            lambda c: c.with_(factor_args=c.factor_args.replace(eigendecomposition_dtype=torch.float32)),
            "eigendecomposition",
        ),
        (lambda c: c.with_(shift=("mean", 1e-6)), "eigendecomposition"),
        (lambda c: c.with_(factor_args=c.factor_args.replace(activation_covariance_dtype=FP16)), "covariance"),
        (lambda c: c.with_(task="summed"), "covariance"),
        (lambda c: c.with_(batch_size=4), "covariance"),
        (lambda c: c.with_(tracked_modules=("fc1",)), "covariance"),
    ],
)
def test_each_stage_key_covers_what_the_stage_and_those_before_it_read(edit, first):
    before = configuration()
    after = edit(before)
    old, new = keys(before), keys(after)
    for stage in STAGES[1:]:
        earlier = STAGES.index(stage) < STAGES.index(first)
        if stage == "self_scores" and first == "pairwise_scores" and after.query_batch_size != before.query_batch_size:
            earlier = True  # the query batch size is the pairwise stage's alone
        assert (old[stage] == new[stage]) is earlier, stage
    assert after.first_difference(before) == first


def every_change() -> list[tuple[str, Target]]:
    rungs = {rung for row in CAUSES for rung in row.ladder} | set(STRATEGY_FALLBACK)
    rungs |= {"float64:end-to-end", "damping:x10-exact", "batch:three-quarters", "task:sum", "set:batch_size=2"}
    rungs |= {"track:fc1,fc2", "low-rank:off"}
    targets = [Target(stage, None, frozenset({stage})) for stage in STAGES[1:]]
    return [(rung, target) for rung in sorted(rungs) for target in targets]


def test_every_change_reports_the_first_stage_whose_settings_it_changed():
    """What a remedy says it re-ran is what the executor re-runs: the stages from the first whose key differs."""
    base = configuration(
        activation_covariance_dtype=FP16,
        gradient_covariance_dtype=FP16,
        lambda_dtype=FP16,
        eigendecomposition_dtype=torch.float32,
    )
    facts = Facts(("pairwise", "self"), heuristic_damping=1.0, damping_floor=1e-6)
    planned = 0
    for rung, target in every_change():
        change, _why = plan(rung, target, base, facts)
        if change is None:
            continue
        planned += 1
        assert change.before is base and change.after != base, rung
        first = STAGES.index(change.first_stage)
        for stage in STAGES[1:first]:
            assert base.stage_key(stage) == change.after.stage_key(stage), (rung, stage)
        assert base.stage_key(change.first_stage) != change.after.stage_key(change.first_stage), rung
    assert planned >= 20
    assert {kind for kind in PLANNERS} >= {rung.partition(":")[0] for rung, _ in every_change()}


def test_the_float64_reference_is_a_change_that_keeps_damping_shift_and_task():
    base = configuration(activation_covariance_dtype=FP16, amp_dtype=torch.bfloat16)
    base = apply("task:sum", base.with_(shift=("mean", 1e-4), score_args=base.score_args.replace(damping_factor=0.5)))
    reference = apply("float64:end-to-end", base)
    assert reference.factor_args.activation_covariance_dtype == torch.float64
    assert reference.factor_args.amp_dtype is None and reference.score_args.score_dtype == torch.float64
    assert (reference.shift, reference.score_args.damping_factor, reference.task) == (base.shift, 0.5, "summed")
