"""Pre-flight sizes: every tracked module's factors and eigendecomposition costed before anything is
fitted; a module too large for the memory budget is named, with the fix, and nothing is fitted."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from influence_doctor import diagnose
from influence_doctor.checks.sizes import check_module_sizes, over_budget
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.demos.uci_mlp import RegressionTask
from influence_doctor.runner.preflight import module_dimensions
from tests.pipelines import small_pipeline


def test_dimensions_are_kronfluences_covariance_sizes(tmp_path):
    report = diagnose(small_pipeline(), out_dir=tmp_path, progress=False, probe_examples=0)
    covariance = report.run.artifacts["covariance"]
    expected = {
        module: (int(a.shape[0]), int(covariance["gradient_covariance"][module].shape[0]))
        for module, a in covariance["activation_covariance"].items()
    }
    assert module_dimensions(report.run.model) == expected
    record = next(s for s in report.document["stages"] if s["name"] == "train")["metrics"]["preflight"]
    first = record["modules"]["0"]
    assert first["covariance_bytes"] == (5 * 5 + 8 * 8) * 4  # float32 covariances
    assert first["eigendecomposition_bytes"] == 4 * 8 * 8 * 8  # float64: matrix, eigenvectors, workspace
    assert record["eigh_reference"]["seconds"] > 0


class FirstOutput(RegressionTask):
    """Regression on the first of many outputs: a wide 'output layer' kronfluence still tracks."""

    def compute_train_loss(self, batch, model, sample=False):
        inputs, targets = batch
        return ((model(inputs)[:, :1] - targets) ** 2).sum()

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


def test_a_module_too_large_for_the_budget_is_named_before_anything_is_fitted(tmp_path):
    """An output layer of 4,000 units: its 4000² gradient covariance needs ~0.5 GiB to eigendecompose in
    float64; with a 256 MiB budget it is named, with the fix, and no stage runs."""

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4000))

    pipeline = small_pipeline(name="wide-head", model=model, task=FirstOutput(), train=None)
    report = diagnose(pipeline, out_dir=tmp_path, progress=False, memory_budget=256 * 2**20)
    (finding,) = [f for f in report.findings if f.check == "preflight.memory"]
    assert (finding.severity, finding.cause, finding.subject) == ("fail", "out-of-memory", "2")
    assert "4000×4000" in finding.message and "partitions do not split" in finding.message
    assert "leave it out of the tracked modules" in finding.message
    stages = {s["name"]: s for s in report.document["stages"]}
    assert all(stages[name]["status"] == "not-run" and stages[name]["calls"] == [] for name in list(stages)[1:])
    assert "pre-flight: 2 cannot be factored" in stages["covariance"]["reason"]
    assert report.status == "sick" and report.remedies == []
    assert ("out-of-memory", "train") in {(p.cause, p.stage) for p in report.problems}


def test_a_slow_eigendecomposition_is_a_projected_warning():
    head = {"activation": 9, "gradient": 30000, "covariance_bytes": 10, "eigendecomposition_seconds": 900.0}
    record = {
        "modules": {"head": head},
        "budget_bytes": None,
        "eigh_reference": {"size": 256, "seconds": 0.01},
        "eigendecomposition_dtype": "float64",
    }
    assert over_budget(record) == []
    (finding,) = check_module_sizes(record, Thresholds()).findings
    assert (finding.check, finding.severity) == ("preflight.eigendecomposition_time", "warn")
    assert "not measured at this size" in finding.message
    assert check_module_sizes(record, Thresholds.from_mapping({"preflight_eigh_seconds": 1000.0})).findings == []


@pytest.mark.parametrize(
    ("budget", "blocked", "projected"), [(10**9, [], []), (800, ["head"], []), (1000, [], ["head"])]
)
def test_over_budget_counts_every_modules_covariances_and_the_working_set(budget, blocked, projected):
    """Counted for head: 600 bytes of covariances + its matrix and eigenvectors (250) = 850; with its
    estimated workspace (250 more), 1100. A fail rests on counted bytes only; the estimate is a warning."""
    record = {
        "modules": {
            "head": {"activation": 9, "gradient": 10, "covariance_bytes": 400, "eigendecomposition_bytes": 500},
            "body": {"activation": 3, "gradient": 3, "covariance_bytes": 200, "eigendecomposition_bytes": 50},
        },
        "budget_bytes": budget,
        "eigendecomposition_dtype": "float64",
    }
    assert over_budget(record) == blocked
    findings = check_module_sizes(record, Thresholds()).findings
    expected = [(m, "fail") for m in blocked] + [(m, "warn") for m in projected]
    assert [(f.subject, f.severity) for f in findings] == expected


def test_the_preflight_comes_before_the_users_training_and_stops_the_run(tmp_path):
    """A module that cannot be factored is named before the user's loop runs: nothing is trained or fitted."""
    calls = []

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4000))

    def train(model, dataset, monitor):
        calls.append("trained")

    pipeline = small_pipeline(name="wide-head-trained", model=model, task=FirstOutput(), train=train)
    report = diagnose(pipeline, out_dir=tmp_path, progress=False, memory_budget=256 * 2**20)
    assert calls == []
    train_stage = next(s for s in report.document["stages"] if s["name"] == "train")
    assert "neither trained nor analysed" in train_stage["reason"] and train_stage["calls"] == []
    assert {f.check for f in report.findings if f.severity == "fail"} == {"preflight.memory"}
    assert report.status == "sick"


def test_a_module_beyond_the_eigensolvers_limit_is_named_even_when_memory_fits(tmp_path):
    """46,341 outputs: a 46341² gradient covariance has more than 2³¹ entries, past what 32-bit LAPACK and
    cuSOLVER index (kronfluence issue #42); a budget of a petabyte does not change that."""

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 46_341))

    pipeline = small_pipeline(name="past-the-solver", model=model, task=FirstOutput(), train=None)
    report = diagnose(pipeline, out_dir=tmp_path, progress=False, memory_budget=2**50)
    (finding,) = [f for f in report.findings if f.severity == "fail"]
    assert (finding.check, finding.subject, finding.value, finding.limit) == (
        "preflight.solver_limit",
        "0",
        46_341.0,
        46_340.0,
    )
    assert "2³¹" in finding.message and "issue #42" in finding.message
    assert report.status == "sick" and report.document["stages"][1]["status"] == "not-run"
    assert module_dimensions(nn.Sequential(nn.Linear(4, 46_340))) == {"0": (5, 46_340)}


class TiedLM(nn.Module):
    """A token embedding and an output layer sharing one matrix, as GPT-2's `lm_head` and `wte` do."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.body(self.wte(tokens))))


def test_a_tracked_weight_tied_to_another_module_is_named():
    from influence_doctor.runner.preflight import tied_weights

    assert tied_weights(TiedLM()) == {"lm_head": ["wte"]}
    assert tied_weights(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))) == {}
    record = {
        "modules": {"lm_head": {"activation": 4, "gradient": 10, "covariance_bytes": 464}},
        "budget_bytes": None,
        "tied": {"lm_head": ["wte"]},
    }
    (finding,) = check_module_sizes(record, Thresholds()).findings
    assert (finding.check, finding.severity, finding.cause) == ("preflight.tied_weights", "warn", "shared-parameters")
    assert "tied to wte" in finding.message
