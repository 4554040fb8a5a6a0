"""The Task's contract with kronfluence, measured for real before any factor: a batch mean instead of a
sum, a batch-dependent model, examples whose loss is inf/NaN alone."""

from __future__ import annotations

import math

import pytest
import torch
from kronfluence.task import Task
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from influence_doctor import diagnose
from influence_doctor.checks.contract import check_examples_finite, check_task_contract, reduction_of
from influence_doctor.checks.thresholds import Thresholds
from tests.pipelines import regression_data, small_pipeline

T = Thresholds()


class MeanClassification(Task):
    """The mistake the issue measured: F.cross_entropy's default batch mean."""

    def compute_train_loss(self, batch, model, sample=False):
        inputs, labels = batch
        logits = model(inputs)
        if sample:
            with torch.no_grad():
                labels = torch.multinomial(F.softmax(logits, dim=-1), 1).flatten()
        return F.cross_entropy(logits, labels)

    def compute_measurement(self, batch, model):
        return F.cross_entropy(model(batch[0]), batch[1])


class SummedClassification(MeanClassification):
    def compute_train_loss(self, batch, model, sample=False):
        return super().compute_train_loss(batch, model, sample) * len(batch[0])

    def compute_measurement(self, batch, model):
        return super().compute_measurement(batch, model) * len(batch[0])


def classification(count: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 6, generator=generator)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())


def classifier(norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    middle = [nn.BatchNorm1d(16, track_running_stats=False)] if norm else []
    return nn.Sequential(nn.Linear(6, 16), *middle, nn.Tanh(), nn.Linear(16, 3)).eval()


def _pipeline(name, task, model, train=None):
    return small_pipeline(
        name=name,
        model=model,
        task=task,
        train_dataset=train or classification(96, seed=0),
        query_dataset=classification(8, seed=1),
        train=None,
        batch_size=32,
        query_batch_size=8,
    )


def _problems(report):
    return {(p.cause, p.stage) for p in report.problems}


def test_a_batch_mean_is_loss_not_summed_and_a_sum_passes(tmp_path):
    mean = diagnose(_pipeline("mean", MeanClassification(), classifier), out_dir=tmp_path, progress=False, fix=False)
    assert ("loss-not-summed", "train") in _problems(mean)
    assert mean.status == "sick"
    (finding,) = [f for f in mean.findings if f.check == "task.loss_reduction" and f.subject == "train loss"]
    assert finding.severity == "fail" and finding.value == pytest.approx(0.25)
    assert "0.5× on a batch of 2" in finding.message and 'reduction="sum"' in finding.message
    # ...with its measured effect: the rankings at two train batch sizes (a partial last batch at 24).
    assert "rankings at train batch sizes 32 and 24 agree at a median per-query Spearman of" in finding.message
    effect = mean.run.probes["batch_size"]["pairwise"]["median_spearman"]
    assert effect < 0.999
    problem = next(p for p in mean.problems if p.cause == "loss-not-summed")
    assert "train batch sizes 32 and 24" in problem.message
    summed = diagnose(_pipeline("summed", SummedClassification(), classifier), out_dir=tmp_path, progress=False)
    assert not [f for f in summed.findings if f.check.startswith("task.")]
    assert summed.status == "healthy"


def test_batch_statistics_in_eval_mode_are_batch_dependent(tmp_path):
    report = diagnose(
        _pipeline("batchnorm", SummedClassification(), lambda: classifier(norm=True)), out_dir=tmp_path, progress=False
    )
    assert ("batch-dependent", "train") in _problems(report)
    (finding,) = [f for f in report.findings if f.check == "task.batch_independence" and f.subject == "train loss"]
    assert "BatchNorm with track_running_stats=False" in finding.message
    assert report.remedies == []  # no setting of kronfluence undoes it


class MaskedMeanRegression(Task):
    """A loss averaged over the targets a mask keeps: 0/0 for an example whose mask is empty."""

    def compute_train_loss(self, batch, model, sample=False):
        inputs, targets, mask = batch
        error = (model(inputs) - targets) ** 2 * mask
        return (error.sum(dim=1) / mask.sum(dim=1)).sum()

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


def test_examples_whose_loss_alone_is_nonfinite_are_named(tmp_path):
    base = regression_data(64)
    mask = torch.ones(64, 1)
    mask[[5, 17]] = 0.0
    data = TensorDataset(base.tensors[0], base.tensors[1], mask)
    queries = TensorDataset(*regression_data(4, seed=1).tensors, torch.ones(4, 1))
    pipeline = small_pipeline(name="masked", task=MaskedMeanRegression(), train_dataset=data, query_dataset=queries)
    pipeline.train = None
    report = diagnose(pipeline, out_dir=tmp_path, progress=False)
    assert ("nonfinite-examples", "train") in _problems(report)
    (finding,) = [f for f in report.findings if f.check == "task.examples_finite"]
    assert finding.value == 2.0 and "indices 5, 17" in finding.message and "scores them 0" in finding.message


def test_the_reduction_of_one_batch_is_read_from_value_and_gradient():
    tol = 1e-8
    summed = {"batch": 4, "batch_value": 4.0, "alone_sum": 4.0, "gradient_scale": 1.0, "gradient_residual": 0.0}
    assert reduction_of(summed, tol) == "sum"
    assert reduction_of({**summed, "batch_value": 1.0, "gradient_scale": 0.25}, tol) == "mean"
    assert reduction_of({**summed, "gradient_residual": 0.3}, tol) == "neither"  # values agree, gradients do not
    assert reduction_of({**summed, "batch_value": 1.7}, tol) == "neither"
    assert reduction_of({"batch": 2, "batch_value": 0.0, "alone_sum": 0.0}, tol) == "sum"


def test_a_task_that_cannot_be_measured_gives_no_finding():
    assert check_task_contract({"error": "RuntimeError: no"}, T).findings == []
    many = {"checked": 100, "nonfinite": list(range(30))}
    (finding,) = check_examples_finite(many, None).findings
    assert "and 10 more" in finding.message and math.isclose(finding.value, 30.0)


def test_a_batch_mean_is_healed_by_making_the_task_a_sum(tmp_path):
    """The rung wraps the Task so each batch's loss is multiplied by its size: rehearsed on the probe, then
    applied; the contract is measured again and holds, and the scores equal those of the correctly summed
    Task (the fix's reference is float64 of what the user meant)."""
    healed = diagnose(_pipeline("mean", MeanClassification(), classifier), out_dir=tmp_path, progress=False)
    assert healed.status == "healed", [p.message for p in healed.problems]
    (remedy,) = healed.remedies
    assert (remedy["cause"], remedy["rung"], remedy["outcome"]) == ("loss-not-summed", "task:sum", "healed")
    assert remedy["rehearsal"]["rehearsed"] is True
    assert not [f for f in healed.findings if f.check == "task.loss_reduction" and f.severity == "fail"]
    assert 'reduction="sum"' in healed.prescription["task"]
    assert healed.document["fidelity"]["fix"]["median_spearman"] > 0.999
    summed = diagnose(_pipeline("summed", SummedClassification(), classifier), out_dir=tmp_path, progress=False)
    from influence_doctor.checks.scores import total_scores

    mine = total_scores(healed.run.artifacts["pairwise_scores"])
    expected = total_scores(summed.run.artifacts["pairwise_scores"])
    assert torch.allclose(mine, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
