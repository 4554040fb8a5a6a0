"""The one executor, on real kronfluence: a stage computed once per scope and stage key, shared by every
configuration that agrees up to it; deterministic per stage; a failing stage a result, not a crash; a
diagonal shift written to a new folder; the covariance over all the data in slices."""

from __future__ import annotations

import hashlib

import pytest
import torch

from influence_doctor.changes import apply
from influence_doctor.configuration import Configuration
from influence_doctor.options import RunOptions
from influence_doctor.progress import StageProgress
from influence_doctor.runner.executor import Executor
from influence_doctor.runner.session import open_session, train
from tests.pipelines import regression_data, small_pipeline


def ready_session(tmp_path, **overrides):
    pipeline = small_pipeline(**overrides)
    session = open_session(pipeline, RunOptions(out_dir=tmp_path, examples=None), StageProgress(enabled=False))
    result = train(session)
    assert result.status == "ok", result.error
    return session, Configuration.of(pipeline)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return ready_session(tmp_path_factory.mktemp("executor"))


def test_the_same_configuration_is_one_trial(prepared):
    session, configuration = prepared
    executor = Executor(session)
    scope = executor.scope("probe", 32)
    first = executor.trial(configuration, scope)
    assert executor.trial(Configuration.of(session.pipeline), executor.scope("probe", 32)) is first
    assert [r.status for r in first.stages.values()] == ["ok"] * 5
    assert first.scores("pairwise").shape == (4, 32) and first.examples == 32


def test_a_damping_change_shares_every_factor_stage_and_recomputes_the_scores(prepared):
    session, configuration = prepared
    executor = Executor(session)
    scope = executor.scope("probe", 32)
    base = executor.trial(configuration, scope)
    spent = executor.seconds(scope)
    heavier = configuration.with_(score_args=configuration.score_args.replace(damping_factor=1.0))
    damped = executor.trial(heavier, scope)
    for stage in ("covariance", "eigendecomposition", "lambda"):
        assert damped.stages[stage] is base.stages[stage]
    for stage in ("pairwise_scores", "self_scores"):
        assert damped.stages[stage] is not base.stages[stage]
        assert not torch.equal(damped.artifacts[stage]["all_modules"], base.artifacts[stage]["all_modules"])
    assert executor.seconds(scope) > spent


def test_a_stage_computes_the_same_numbers_whenever_it_is_computed(tmp_path):
    """Seeds are set per stage: a fresh executor (another process's order of trials) computes bit-identical
    factors and scores, which is what lets two configurations share the stages they agree on."""
    session, configuration = ready_session(tmp_path)
    first = Executor(session)
    first.trial(apply("float64:end-to-end", configuration), first.scope("probe", 32))
    one = first.trial(configuration, first.scope("probe", 32))
    other = Executor(session).trial(configuration, Executor(session).scope("probe", 32))
    for stage, artifact in one.artifacts.items():
        for name, value in artifact.items():
            tensors = value.values() if isinstance(value, dict) else [value]
            others = other.artifacts[stage][name]
            others = others.values() if isinstance(others, dict) else [others]
            assert all(torch.equal(a, b) for a, b in zip(tensors, others, strict=True)), (stage, name)


def test_a_stage_that_raises_is_a_result_and_the_stages_that_need_it_are_not_run(tmp_path):
    data = regression_data(64)
    data.tensors[0][5, 2] = float("nan")  # the covariance holds NaN: eigh gives up
    session, configuration = ready_session(tmp_path, train=None, train_dataset=data)
    executor = Executor(session)
    trial = executor.trial(configuration, executor.scope("rehearsal"))
    assert trial.stages["eigendecomposition"].status == "error"
    assert trial.failure("eigendecomposition").startswith("_LinAlgError: ")
    assert trial.failure("pairwise_scores") == "not reached (eigendecomposition raised)"
    assert [trial.stages[s].status for s in ("lambda", "pairwise_scores", "self_scores")] == ["not-run"] * 3


def test_a_shift_reads_the_shared_covariance_and_writes_a_doctored_copy(tmp_path):
    session, configuration = ready_session(tmp_path, factor_args=small_pipeline().factor_args)
    executor = Executor(session)
    scope = executor.scope("rehearsal")
    base = executor.trial(configuration, scope)
    folder = session.analyzer.factors_output_dir(base.stages["covariance"].folder)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    shifted = executor.trial(configuration.with_(shift=("mean", 1e-2)), scope)
    covariance = shifted.stages["covariance"]
    assert "__doctored_" in covariance.folder and covariance.key != base.stages["covariance"].key
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} == before
    original = base.artifacts["covariance"]["activation_covariance"]["0"].double()
    doctored = covariance.artifact["activation_covariance"]["0"].double()
    lift = torch.diagonal(doctored - 0.5 * (original + original.T))
    assert torch.allclose(lift, torch.full_like(lift, 1e-2 * float(torch.diagonal(original).mean())))
    assert shifted.stages["eigendecomposition"] is not base.stages["eigendecomposition"]


def test_the_covariance_over_all_the_data_is_the_sum_of_its_slices(prepared):
    session, configuration = prepared
    executor = Executor(session)
    count = executor.full_size_covariance(configuration)
    assert count.examples == count.total_examples == len(session.train_dataset) and count.error is None
    assert count.total() == 0 and executor.full_size_covariance(configuration) is count
    whole = executor.trial(configuration.with_(batch_size=configuration.batch_size), executor.scope("rehearsal"))
    assert sum(count.entries.values()) == sum(
        t.numel()
        for factor in ("activation_covariance", "gradient_covariance")
        for t in whole.artifacts["covariance"][factor].values()
    )


def test_a_configuration_tracking_other_modules_runs_a_copy_prepared_for_them(prepared):
    """`track:` replaces the Task's choice of modules: the stages run on a copy of the trained model
    prepared to track those alone, and the run's own model is left as it was."""
    from kronfluence.module.tracked_module import TrackedModule

    session, configuration = prepared
    executor = Executor(session)
    scope = executor.scope("probe", 32)
    everything = executor.trial(configuration, scope)
    last = apply("track:2", configuration)
    only_last = executor.trial(last, scope)
    assert set(everything.artifacts["covariance"]["activation_covariance"]) == {"0", "2"}
    assert set(only_last.artifacts["covariance"]["activation_covariance"]) == {"2"}
    assert only_last.stages["covariance"] is not everything.stages["covariance"]
    copy, _analyzer = session.prepared_for(last)
    assert copy is not session.model and session.prepared_for(configuration)[0] is session.model
    assert [n for n, m in copy.named_modules() if isinstance(m, TrackedModule)] == ["2"]
    assert [n for n, m in session.model.named_modules() if isinstance(m, TrackedModule)] == ["0", "2"]
    one_module = only_last.artifacts["pairwise_scores"]["all_modules"]
    per_module = executor.trial(
        configuration.with_(score_args=configuration.score_args.replace(compute_per_module_scores=True)), scope
    ).artifacts["pairwise_scores"]["2"]
    assert torch.allclose(one_module, per_module, rtol=1e-4, atol=1e-6)  # same module, same factors
