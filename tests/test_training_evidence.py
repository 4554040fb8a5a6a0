"""Training judged on the doctor's own measurement, through `diagnose` on real training loops: a sign
error is convicted by the direction training moved, a fine-tuned converged model is judged on the scale
of a fresh model's loss."""

from __future__ import annotations

import pytest
import torch
from kronfluence.arguments import FactorArguments
from torch import nn

from influence_doctor import Pipeline, diagnose
from influence_doctor.demos.uci_mlp import RegressionTask, synthetic_regression


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def _converged() -> nn.Module:
    """A model already fitted to the training set (a checkpoint the user fine-tunes)."""
    model = _model()
    x, y = synthetic_regression(128, seed=0).tensors
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(500):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return model


def _loop(steps: int, lr: float, maximize: bool = False):
    def train(model, dataset, monitor) -> None:
        x, y = dataset.tensors
        generator = torch.Generator().manual_seed(0)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, maximize=maximize)
        for _ in range(steps):
            rows = torch.randint(0, len(x), (2,), generator=generator)
            loss = nn.functional.mse_loss(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.log(loss)

    return train


def _pipeline(train, model=_model) -> Pipeline:
    return Pipeline(
        name="evidence",
        model=model,
        task=RegressionTask(),
        train_dataset=synthetic_regression(128, seed=0),
        query_dataset=synthetic_regression(8, seed=1),
        train=train,
        factor_args=FactorArguments(strategy="ekfac"),
        batch_size=64,
        query_batch_size=8,
    )


def _train_findings(report):
    stage = next(stage for stage in report.document["stages"] if stage["name"] == "train")
    return stage, [f for f in stage["findings"] if f["check"].startswith("train.")]


def test_gradient_ascent_on_noisy_batches_is_a_sign_error(tmp_path):
    """`maximize=True` at a small step on batches of two: the logged loss stays inside its noise, the
    measured loss rises a little, and training moved along the starting gradient."""
    report = diagnose(_pipeline(_loop(60, 0.01, maximize=True)), out_dir=tmp_path, progress=False, probe_examples=0)
    stage, findings = _train_findings(report)
    uphill = [f for f in findings if f["check"] == "train.uphill"]
    assert [(f["severity"], f["cause"]) for f in uphill] == [("fail", "training-diverged")]
    assert stage["metrics"]["sample_loss"]["uphill_cosine"] > 0.5
    assert report.status == "sick"
    assert next((p.cause, p.stage) for p in report.problems) == ("training-diverged", "train")
    assert report.remedies == []


def test_the_same_loop_descending_is_healthy(tmp_path):
    report = diagnose(_pipeline(_loop(60, 0.01)), out_dir=tmp_path, progress=False, probe_examples=0)
    stage, findings = _train_findings(report)
    assert stage["metrics"]["sample_loss"]["uphill_cosine"] < 0
    assert [f for f in findings if f["severity"] == "fail"] == []


def test_fine_tuning_a_converged_model_is_judged_against_a_fresh_models_loss(tmp_path):
    """Converged on the full batch, then SGD on batches of two at a step that lifts the near-zero loss:
    a rise against its start, nothing against a freshly initialised copy's."""
    report = diagnose(_pipeline(_loop(40, 0.05), model=_converged), out_dir=tmp_path, progress=False, probe_examples=0)
    stage, findings = _train_findings(report)
    sample = stage["metrics"]["sample_loss"]
    assert sample["reference"] > 10 * sample["untrained"]  # the start was already fitted
    assert sample["trained"] > 5 * sample["untrained"]  # against its start alone, a blow-up
    assert [(f["check"], f["severity"]) for f in findings if f["severity"] != "info"] == [
        ("train.trained_loss", "warn")
    ]
    assert stage["metrics"]["checks"]["loss"]["reference_loss_ratio"] == pytest.approx(
        sample["trained"] / sample["reference"]
    )
