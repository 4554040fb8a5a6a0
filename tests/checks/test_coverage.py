"""Coverage facts and the coverage check on small hand-built models, prepared by the real kronfluence."""

from __future__ import annotations

import torch
from kronfluence.analyzer import prepare_model
from torch import nn

from influence_doctor.checks.coverage import check_coverage, coverage_facts
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.demos.uci_mlp import RegressionTask

T = Thresholds()


class Projection(nn.Module):
    """A Conv1D-like module: a weight used directly in forward, which kronfluence cannot track."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(inputs, outputs))

    def forward(self, x):
        return x @ self.weight


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)  # 40
        self.norm = nn.LayerNorm(4)  # 8
        self.fc = nn.Linear(4, 6)  # 30, tracked
        self.proj = Projection(6, 50)  # 300, untracked
        self.unused = nn.Linear(3, 3)  # 12, tracked but never called
        self.scale = nn.Parameter(torch.ones(1))  # 1, used by the root directly

    def forward(self, ids):
        return (self.proj(torch.tanh(self.fc(self.norm(self.embed(ids)))))).sum(-1, keepdim=True) * self.scale


def prepared(model):
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return prepare_model(model, RegressionTask()), trainable


def test_parameters_are_counted_once_by_who_owns_them():
    model, trainable = prepared(Mixed())
    facts = coverage_facts(model, called={"fc"}, trainable=trainable)
    assert facts.tracked == 30 + 12 and facts.trainable == 40 + 8 + 30 + 300 + 12 + 1
    assert facts.untracked_by_type == {
        "Embedding": {"modules": 1, "parameters": 40},
        "LayerNorm": {"modules": 1, "parameters": 8},
        "Projection": {"modules": 1, "parameters": 300},
    }
    assert facts.outside_leaf_modules == {"(the model itself)": 1}
    assert sorted(facts.tracked_modules) == ["fc", "unused"] and facts.never_called == ["unused"]


def test_a_minority_tracked_warns_with_the_biggest_untracked_type_and_never_called_modules_warn():
    model, trainable = prepared(Mixed())
    outcome = check_coverage(coverage_facts(model, called={"fc"}, trainable=trainable), T)
    by_check = {f.check: f for f in outcome.findings}
    coverage = by_check["train.coverage"]
    assert (coverage.severity, coverage.cause, coverage.subject) == ("warn", "untracked-modules", "Projection")
    assert coverage.value == 42 / 391 and coverage.limit == T.preflight.min_tracked_share
    assert by_check["train.coverage_never_called"].subject == "unused"
    assert by_check["train.coverage_summary"].severity == "info"
    assert all(f.severity != "fail" for f in outcome.findings)  # about meaning, never a numerical failure


def test_a_fully_tracked_model_gets_only_the_summary():
    model, trainable = prepared(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)))
    outcome = check_coverage(coverage_facts(model, called={"0", "2"}, trainable=trainable), T)
    assert [f.check for f in outcome.findings] == ["train.coverage_summary"]
    assert outcome.metrics["coverage"]["tracked_share"] == 1.0


def test_a_replaceable_type_warns_even_when_most_parameters_are_tracked():
    class Conv1D(Projection):
        pass

    model = nn.Sequential(nn.Linear(100, 100), Conv1D(100, 2))
    model, trainable = prepared(model)
    (warning,) = [
        f for f in check_coverage(coverage_facts(model, trainable=trainable), T).findings if f.check == "train.coverage"
    ]
    assert warning.subject == "Conv1D" and warning.value > 0.9 and "nn.Linear" in warning.message


def test_frozen_parameters_do_not_count_and_facts_read_back_from_a_report():
    model = nn.Sequential(nn.Embedding(1000, 4), nn.Linear(4, 1))
    model[0].weight.requires_grad_(False)  # a frozen embedding is nobody's concern
    model, trainable = prepared(model)
    facts = coverage_facts(model, trainable=trainable)
    assert facts.tracked_share == 1.0
    again = check_coverage(facts.to_dict(), T)  # the report's metrics dictionary works as well
    assert [f.check for f in again.findings] == ["train.coverage_summary"]


def test_tracked_modules_training_never_changed_are_a_warning_listing_them_and_the_trained_ones():
    from influence_doctor.checks.coverage import check_frozen

    frozen = [f"h.{i}.base_layer" for i in range(5)]
    trained = ["h.0.lora_A", "h.0.lora_B"]
    outcome = check_frozen(frozen, trained)
    (finding,) = outcome.findings
    assert (finding.check, finding.severity, finding.cause) == ("train.frozen_tracked", "warn", "frozen-tracked")
    assert finding.value == 5 and finding.subject == ", ".join(frozen)
    assert "h.0.base_layer" in finding.message and "… 2 more" in finding.message
    assert "h.0.lora_A, h.0.lora_B" in finding.message and "get_influence_tracked_modules" in finding.message
    assert outcome.metrics == {"frozen": frozen, "trained": trained}


def test_all_trained_or_nothing_trained_says_nothing_about_frozen_modules():
    from influence_doctor.checks.coverage import check_frozen

    assert check_frozen([], ["fc"]).findings == []
    assert check_frozen(["fc"], []).findings == []  # no training at all (train=None): not a fine-tune
