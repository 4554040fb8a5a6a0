"""The projection of the full run: memory per stage from what was measured, advice in kronfluence's
documented order that really fits when applied, and time fitted per batch."""

from __future__ import annotations

import json
import math

import pytest
from kronfluence.arguments import FactorArguments, ScoreArguments

from influence_doctor.changes import apply
from influence_doctor.configuration import Arguments, Configuration
from influence_doctor.pipeline import STAGES
from influence_doctor.projection.memory import (
    ModuleShape,
    candidates,
    project_stage,
    score_bytes,
    working_bytes,
)
from influence_doctor.projection.time import TimeModel, batches, fit, from_batch_stamps

SHAPES = [ModuleShape("fc1", 769, 768), ModuleShape("fc2", 769, 1)]


def settings(**factor):
    return Configuration(Arguments.of(FactorArguments(**factor)), Arguments.of(ScoreArguments()), 64, 4)


def test_iterative_lambda_aggregation_drops_one_of_three_per_sample_gradient_copies():
    plain, iterative = settings(), settings(use_iterative_lambda_aggregation=True)
    psg = 64 * 769 * 768 * 4
    assert working_bytes("lambda", SHAPES, plain) - working_bytes("lambda", SHAPES, iterative) == psg


def test_partitions_and_smaller_batches_shrink_their_stage():
    base = working_bytes("covariance", SHAPES, settings())
    assert working_bytes("covariance", SHAPES, settings(covariance_module_partitions=2)) == pytest.approx(base / 2)
    half = apply("batch:half", settings())
    assert half.batch_size == 32 and working_bytes("covariance", SHAPES, half) < base
    low_rank = apply("set:score_args.query_gradient_low_rank=32", settings())
    assert working_bytes("pairwise_scores", SHAPES, low_rank) < working_bytes("pairwise_scores", SHAPES, settings())


def test_the_score_matrix_is_what_grows_with_the_examples():
    measured = {
        "start_bytes": 1000,
        "peak_bytes": 1000 + 10_000 + score_bytes("pairwise_scores", 4, 256, settings(), 2),
    }
    projected = project_stage("pairwise_scores", measured, SHAPES, settings(), settings(), (4, 256, 16, 8192))
    assert projected == pytest.approx(1000 + 10_000 + 16 * 8192 * 4)
    lam = {"start_bytes": 1000, "peak_bytes": 50_000}
    assert project_stage("lambda", lam, SHAPES, settings(), settings(), (4, 256, 16, 8192)) == 50_000


def test_advice_follows_kronfluences_documented_order_per_stage():
    order = [change for change, _ in candidates("lambda", settings(), SHAPES, "cuda")]
    assert order[:3] == [
        "use_iterative_lambda_aggregation=True",
        "offload_activations_to_cpu=True",
        "lambda_module_partitions=2",
    ]
    cpu = [change for change, _ in candidates("lambda", settings(), SHAPES, "cpu")]
    assert "offload_activations_to_cpu=True" not in cpu  # offloading to the CPU saves nothing on the CPU
    covariance = [change for change, _ in candidates("covariance", settings(), SHAPES, "cpu")]
    assert covariance[0] == "per_device_batch_size=32" and covariance[-1] == "covariance_module_partitions=2"
    scores = [change for change, _ in candidates("pairwise_scores", settings(), SHAPES, "cpu")]
    assert scores[0] == "query_gradient_low_rank=256" and "module_partitions=2" in scores


def test_time_is_fitted_per_batch():
    assert batches("covariance", 1000, 16, 64, 8) == 16
    assert batches("pairwise_scores", 1000, 16, 64, 8) == 32
    assert batches("pairwise_scores", 1000, 16, 64, 16) == 16  # all queries in one batch: no extra cost
    assert batches("eigendecomposition", 10**6, 16, 64, 8) == 1
    model = fit([(1, 0.3), (16, 1.8)])
    assert model.fixed == pytest.approx(0.2) and model.per_batch == pytest.approx(0.1)
    assert fit([(4, 2.0)]) == TimeModel(0.0, 0.5)
    assert fit([(1, 1.0), (16, 0.5)]).per_batch == 0.0  # noise, not a negative cost
    assert fit([]) is None


def test_per_batch_time_is_the_median_interval_between_batches():
    # One slow first batch and noise around 0.1 s per batch; the total leaves a fixed 0.5 s.
    stamps = [0.0, 0.9, 1.0, 1.1, 1.21, 1.3]
    model = from_batch_stamps(stamps, work=6, seconds=2.5)
    assert model.per_batch == pytest.approx(0.1) and model.fixed == pytest.approx(2.5 - 0.6)
    # Two forwards per batch (a task that calls the model twice): one batch spans two of them.
    twice = [t for start in (0.0, 0.2, 0.4, 0.6) for t in (start, start + 0.05)]
    assert from_batch_stamps(twice, work=4, seconds=1.0).per_batch == pytest.approx(0.2)
    # Too few batches, no forwards (the task never calls the model itself), or no measured total.
    assert from_batch_stamps([0.0, 0.1], work=2, seconds=0.3) is None
    assert from_batch_stamps([], work=16, seconds=1.0) is None
    assert from_batch_stamps(stamps, work=6, seconds=None) is None
    assert from_batch_stamps(stamps, work=6, seconds=0.1).fixed == 0.0  # never a negative fixed part


def test_a_rehearsal_times_its_batches_and_projects_from_them(tmp_path):
    from influence_doctor import diagnose
    from influence_doctor.demos import load_demo

    report = diagnose(load_demo("uci-mlp"), fix=False, out_dir=tmp_path, progress=False, probe_examples=0, examples=640)
    batches_per_pass = math.ceil(640 / report.run.train_batch_size)  # five
    for name in ("covariance", "lambda", "self_scores"):
        assert report.document["stages"][STAGES.index(name)]["metrics"]["forward_calls"] == batches_per_pass
    projected = report.document["projection"]["stages"]
    for name in ("covariance", "lambda", "pairwise_scores", "self_scores"):
        assert projected[name]["model"]["from"] == "batch intervals", name
        assert projected[name]["model"]["seconds_per_batch"] > 0
    assert projected["eigendecomposition"]["model"]["from"] == "sizes"  # one eigh per factor: no batches


@pytest.mark.slow
def test_memory_advice_when_applied_runs_within_the_budget(cli, tmp_path):
    """A budget below the projected Λ peak: the advice, applied, runs Λ within the budget (each run in
    its own process, so nothing another run held is counted)."""

    def lambda_memory(target, *flags):
        done = cli(
            "diagnose",
            target,
            "--no-fix",
            "--probe-examples",
            "0",
            "--format",
            "json",
            "--quiet",
            "--out",
            str(tmp_path),
            *flags,
        )
        assert done.returncode in (0, 1), done.stderr
        document = json.loads(done.stdout)
        stage = next(s for s in document["stages"] if s["name"] == "lambda")
        return document, stage["metrics"]["memory"]

    document, measured = lambda_memory("tests.pipelines:wide_lambda", "--examples", "256")
    projected = document["projection"]["stages"]["lambda"]["peak_bytes"]
    working = projected - measured["start_bytes"]
    assert working > 300 * 2**20  # per-sample gradients dominate: ~3 copies of 150 MB
    budget = int(measured["start_bytes"] + 0.85 * working)
    document, _ = lambda_memory("tests.pipelines:wide_lambda", "--examples", "256", "--memory-budget", str(budget))
    (advice,) = [a for a in document["projection"]["advice"] if a["stage"] == "lambda"]
    assert advice["setting"] == "use_iterative_lambda_aggregation=True" and advice["fits"]
    assert advice["projected_peak_bytes"] <= budget
    _, applied = lambda_memory("tests.pipelines:wide_lambda_iterative", "--full")
    assert applied["peak_bytes"] <= budget, (applied, budget)


def test_the_rehearsal_is_the_largest_prefix_within_a_tenth_of_the_projected_full_run():
    from influence_doctor.projection.rehearsal import plan_rehearsal

    models = {"covariance": TimeModel(0.5, 0.1), "eigendecomposition": TimeModel(1.0, 0.0)}
    plan = plan_rehearsal(models, total=64_000, queries=(16, 16), batch_size=64, query_batch_size=16)
    assert plan.full_seconds == pytest.approx(0.5 + 100.0 + 1.0)
    assert plan.rehearsal_seconds <= 0.1 * plan.full_seconds < plan.rehearsal_seconds + 0.1 + 1e-9
    assert plan.examples == pytest.approx(64 * 86, abs=64)  # (10.15 − 1.5) / 0.1 batches
    assert plan.reason == "10% of the projected full run"


def test_the_rehearsal_never_goes_below_the_minimum_nor_above_the_data():
    from influence_doctor.projection.rehearsal import MIN_REHEARSAL, plan_rehearsal

    models = {"covariance": TimeModel(2.0, 0.01)}  # fixed costs dominate a short run
    small = plan_rehearsal(models, total=10_000, queries=(16, 16), batch_size=64, query_batch_size=16)
    assert small.examples == MIN_REHEARSAL and "minimum" in small.reason
    tiny = plan_rehearsal(models, total=100, queries=(16, 16), batch_size=64, query_batch_size=16)
    assert tiny.examples == 100


def test_process_age_counts_what_the_process_spent_before_the_work(tmp_path):
    """The command line hands the rehearsal's budget the time its imports took: a full run pays it too."""
    import subprocess
    import sys

    code = "import time; time.sleep(0.6); from influence_doctor.environment import process_age; print(process_age())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    age = float(done.stdout)
    assert 0.6 <= age < 60
