"""The stage runner on real kronfluence: stages, skips, recorded exceptions, partial reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kronfluence.arguments import FactorArguments

from influence_doctor import STAGES, diagnose
from influence_doctor.report.diff import differences
from tests.pipelines import regression_data, small_pipeline


def _statuses(report) -> dict[str, str]:
    return {stage["name"]: stage["status"] for stage in report.document["stages"]}


def test_healthy_small_pipeline_runs_every_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = diagnose(small_pipeline(), out_dir=tmp_path / "reports", progress=False)
    assert report.status == "healthy"
    assert _statuses(report) == dict.fromkeys(STAGES, "ok")
    stages = {stage["name"]: stage for stage in report.document["stages"]}
    assert stages["covariance"]["calls"] == ["fit_covariance_matrices"]
    assert stages["self_scores"]["calls"] == ["compute_self_scores"]
    assert stages["covariance"]["configured_dtypes"]["activation_covariance_dtype"] == "float32"
    stored = stages["eigendecomposition"]["metrics"]["stored"]["activation_eigenvectors"]
    assert stored["0"] == {"shape": [5, 5], "dtype": "float32"}
    assert report.document["scores"]["pairwise"]["shape"] == [4, 64]
    assert report.document["scores"]["self"]["finite_fraction"] == 1.0
    # kronfluence wrote only inside the run's own folder.
    assert not (tmp_path / "influence_results").exists()
    assert [p.name for p in (report.run_dir / "kronfluence" / "small").glob("factors_factors-*") if p.is_dir()]
    assert json.loads((report.run_dir / "report.json").read_text()) == report.document


def test_eigh_failure_is_recorded_and_dependants_not_run(tmp_path):
    data = regression_data(64)
    data.tensors[0][5, 2] = float("nan")  # one corrupt feature: the covariance holds NaN, eigh gives up
    report = diagnose(small_pipeline(train=None, train_dataset=data), out_dir=tmp_path, progress=False)
    stages = {stage["name"]: stage for stage in report.document["stages"]}
    assert stages["eigendecomposition"]["status"] == "error"
    assert stages["eigendecomposition"]["error"]["type"] == "torch._C._LinAlgError"
    assert "linalg.eigh" in stages["eigendecomposition"]["error"]["message"]
    assert [f["check"] for f in stages["eigendecomposition"]["findings"]] == ["eigendecomposition.raised"]
    for later in ("lambda", "pairwise_scores", "self_scores"):
        assert stages[later]["status"] == "not-run"
        assert stages[later]["reason"] == "stage 'eigendecomposition' did not complete"
        assert stages[later]["calls"] == []
    assert report.status == "sick"
    assert report.document["scores"] == {}


def test_exception_in_user_training_is_recorded(tmp_path):
    def exploding_train(model, dataset, monitor):
        monitor.log(1.0)
        raise RuntimeError("CUDA driver went away")

    report = diagnose(small_pipeline(train=exploding_train), out_dir=tmp_path, progress=False)
    statuses = _statuses(report)
    assert statuses["train"] == "error"
    assert all(statuses[name] == "not-run" for name in STAGES[1:])
    train = report.document["stages"][0]
    assert train["error"] == {"type": "RuntimeError", "message": "CUDA driver went away"}
    assert train["metrics"]["curve"]["loss"] == [1.0]
    assert report.status == "sick"


@pytest.mark.parametrize(
    ("strategy", "skipped"),
    [
        ("kfac", {"lambda"}),
        ("diagonal", {"covariance", "eigendecomposition"}),
        ("identity", {"covariance", "eigendecomposition", "lambda"}),
    ],
)
def test_stages_a_strategy_does_not_need_are_skipped(tmp_path, strategy, skipped):
    report = diagnose(small_pipeline(factor_args=FactorArguments(strategy=strategy)), out_dir=tmp_path, progress=False)
    statuses = _statuses(report)
    assert {name for name, status in statuses.items() if status == "skipped"} == skipped
    assert all(statuses[name] in ("ok", "warn") for name in set(STAGES) - skipped)
    assert report.document["scores"]["self"]["finite_fraction"] == 1.0


def test_only_requested_scores_are_computed(tmp_path):
    report = diagnose(small_pipeline(scores=("self",)), out_dir=tmp_path, progress=False)
    assert _statuses(report)["pairwise_scores"] == "skipped"
    assert set(report.document["scores"]) == {"self"}


def test_rehearsal_subsample_is_seeded_and_sized(tmp_path):
    first = diagnose(small_pipeline(), out_dir=tmp_path, examples=20, queries=2, progress=False)
    second = diagnose(small_pipeline(), out_dir=tmp_path, examples=20, queries=2, progress=False)
    assert first.run.train_indices == second.run.train_indices
    assert len(first.run.train_indices) == 20
    assert first.document["scores"]["pairwise"]["shape"] == [2, 20]
    assert first.document["pipeline"]["rehearsal"] == {
        "examples": 20,
        "examples_total": 64,
        "queries": 2,
        "full": False,
        "plan": None,  # a size was given: no time budget
    }
    # Same pipeline, same seed, same machine: bit-identical scores.
    assert first.document["scores"]["pairwise"]["digest"] == second.document["scores"]["pairwise"]["digest"]
    assert first.run_dir != second.run_dir


def test_interrupt_writes_a_partial_report(tmp_path):
    def interrupted_train(model, dataset, monitor):
        monitor.log(3.0)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        diagnose(small_pipeline(train=interrupted_train), out_dir=tmp_path, progress=False)
    (report_path,) = Path(tmp_path).glob("small/*/report.json")
    document = json.loads(report_path.read_text())
    assert document["pipeline"]["partial"] is True
    assert document["pipeline"]["interrupted_in"] == "train"
    assert document["stages"][0]["status"] == "interrupted"
    assert document["status"] == "sick"


def test_model_given_as_module_and_nonfinite_scores_fail(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    queries = regression_data(4, seed=1)
    queries.tensors[0][1, 0] = float("inf")  # one broken query poisons its row of pairwise scores
    report = diagnose(small_pipeline(model=model, train=None, query_dataset=queries), out_dir=tmp_path, progress=False)
    statuses = _statuses(report)
    assert statuses["self_scores"] == "ok"
    assert statuses["pairwise_scores"] == "fail"
    fails = {f["check"]: f for f in report.document["stages"][4]["findings"] if f["severity"] == "fail"}
    assert set(fails) == {"scores.finite", "scores.reference_finite"}  # float64 cannot compute them either
    finding = fails["scores.finite"]
    assert finding["value"] == pytest.approx(0.75)  # one query row of four is non-finite
    assert report.document["scores"]["pairwise"]["nonfinite"] == 64
    assert report.status == "sick"
    # Not precision (float64 keeps it) and not damping (×10 keeps it): the data itself is non-finite.
    (problem,) = report.problems  # one root cause explains both
    assert problem.cause == "nonfinite-model" and not problem.treatable
    assert {f.check for f in problem.evidence} == {"scores.finite", "scores.reference_finite"}
    verdicts = [e.verdict for e in problem.experiments]
    assert "refutes tiny-damping" in verdicts and verdicts[-1] == "confirms nonfinite-model"
    assert report.remedies == []


VOLATILE = {"seconds", "training_seconds", "run_id", "run_dir", "analysis_dir", "memory", "speed", "timing"}
"""Timings, places and the measured memory peaks of the machine: the rest must be identical."""


def _without_timings(value):
    if isinstance(value, dict):
        return {
            key: _without_timings(v) for key, v in value.items() if key not in VOLATILE and not key.endswith("_seconds")
        }
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def test_same_pipeline_and_seed_give_identical_reports_apart_from_timings(tmp_path):
    first = diagnose(small_pipeline(), out_dir=tmp_path, progress=False)
    second = diagnose(small_pipeline(), out_dir=tmp_path, progress=False)
    assert first.run_dir != second.run_dir
    assert _without_timings(first.document) == _without_timings(second.document)
    assert differences(first.document, second.document) == []  # and `compare` says so
    other_seed = diagnose(small_pipeline(), out_dir=tmp_path, progress=False, seed=1)
    assert other_seed.document["scores"]["self"]["digest"] != first.document["scores"]["self"]["digest"]


def _stored_bytes(per_factor: dict) -> int:
    return sum(t.numel() * t.element_size() for per_module in per_factor.values() for t in per_module.values())


def test_rehearsal_projects_exact_factor_memory_and_scaled_time(tmp_path):
    report = diagnose(small_pipeline(), out_dir=tmp_path, examples=16, progress=False, probe_examples=0)
    projection = report.document["projection"]
    artifacts = report.run.artifacts
    covariance = {k: v for k, v in artifacts["covariance"].items() if not k.startswith("num_")}
    assert projection["factor_bytes"] == {
        "covariance": _stored_bytes(covariance),
        "eigendecomposition": _stored_bytes(artifacts["eigendecomposition"]),
        "lambda": _stored_bytes({"lambda_matrix": artifacts["lambda"]["lambda_matrix"]}),
    }
    assert (projection["examples_rehearsal"], projection["examples_full"]) == (16, 64)
    covariance_stage = projection["stages"]["covariance"]
    # One measured size (the probes are off): time per batch, 1 batch rehearsed, 4 at full size.
    assert covariance_stage["seconds"] == pytest.approx(4 * covariance_stage["rehearsal_seconds"])
    eigen = projection["stages"]["eigendecomposition"]
    assert eigen["seconds"] == pytest.approx(eigen["rehearsal_seconds"])  # one eigh per factor, whatever the data
    # Peak memory starts from what each stage measured; the score matrix grows with the examples.
    for stage in ("covariance", "lambda", "pairwise_scores"):
        measured = report.run.stages[stage].metrics["memory"]
        assert projection["stages"][stage]["rehearsal_peak_bytes"] == measured["peak_bytes"] > 0
        assert projection["stages"][stage]["peak_bytes"] >= measured["peak_bytes"]
    assert projection["stages"]["covariance"]["fits"] is True and projection["advice"] == []
    full = diagnose(small_pipeline(), out_dir=tmp_path, examples=None, progress=False, probe_examples=0)
    assert full.document["projection"] == {}  # nothing to project when the run was already full


def test_training_is_measured_on_a_fixed_sample_without_touching_the_random_draws(tmp_path):
    """The loss on a sample of training examples before and after the user's loop, in eval mode: the
    loop still sees the random draws it would see without the doctor, and the model its own mode."""
    from influence_doctor.environment import seed_everything
    from tests.pipelines import build_small_mlp, quick_train

    seen = {}

    def train(model, dataset, monitor):
        seen["draw"] = torch.rand(3)
        seen["training"] = model.training
        quick_train(model, dataset, monitor)

    report = diagnose(small_pipeline(train=train), out_dir=tmp_path, progress=False, seed=7)
    seed_everything(7)
    build_small_mlp()
    assert torch.equal(seen["draw"], torch.rand(3))
    assert seen["training"] is True
    train_stage = next(stage for stage in report.document["stages"] if stage["name"] == "train")
    sample = train_stage["metrics"]["sample_loss"]
    assert sample["examples"] == 64  # the whole (small) training set
    assert 0 < sample["trained"] < sample["untrained"]
    ratio = train_stage["metrics"]["checks"]["loss"]["trained_loss_ratio"]
    assert ratio == pytest.approx(sample["trained"] / sample["untrained"])
