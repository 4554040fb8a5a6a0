"""The true Fisher's sampled targets are a function of the seed and the example only: identical in a float32
and a float64 trial, at two batch sizes, and independent under a second sampling seed. Without this, a
float64 reference draws other targets (torch's float32 and float64 normals differ from one seed) and
every precision comparison measures Monte-Carlo noise too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kronfluence.task import Task

from influence_doctor import changes
from influence_doctor.configuration import Configuration
from influence_doctor.options import RunOptions
from influence_doctor.progress import StageProgress
from influence_doctor.runner import sampling
from influence_doctor.runner.executor import Executor
from influence_doctor.runner.session import open_session, train
from tests.pipelines import small_pipeline


class RecordingRegression(Task):
    """Gaussian targets around the prediction, as kronfluence's regression examples draw them; each
    batch's noise is recorded."""

    def __init__(self) -> None:
        self.noise: list[torch.Tensor] = []

    def compute_train_loss(self, batch, model, sample=False):
        inputs, targets = batch
        outputs = model(inputs)
        if sample:
            with torch.no_grad():
                noise = torch.randn_like(outputs)
                self.noise.append(noise.double().cpu())
                targets = outputs.detach() + noise
        return F.mse_loss(outputs, targets, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    pipeline = small_pipeline(task=RecordingRegression())
    options = RunOptions(out_dir=tmp_path_factory.mktemp("sampling"), examples=None)
    session = open_session(pipeline, options, StageProgress(enabled=False))
    assert train(session).status == "ok"
    return session


def drawn(session, configuration: Configuration) -> torch.Tensor:
    """The noise the Task drew in the covariance and lambda stages of one trial at the probe's 32 examples."""
    task = session.pipeline.task
    task.noise.clear()
    executor = Executor(session)
    trial = executor.trial(configuration, executor.scope("probe", 32))
    assert trial.reached("lambda"), trial.errors
    return torch.cat(task.noise)


def test_a_float64_trial_draws_the_same_targets_as_the_bfloat16_autocast_one(session):
    """Under autocast the model's outputs are bfloat16, in the float64 reference float32: torch alone draws
    their noise as different numbers from one seed."""
    asked = Configuration.of(session.pipeline)
    autocast = asked.with_(factor_args=asked.factor_args.replace(amp_dtype=torch.bfloat16))
    low, double = drawn(session, autocast), drawn(session, changes.apply(changes.FLOAT64, autocast))
    assert low.shape == double.shape == (64, 1)  # 32 examples, covariance then lambda
    assert torch.equal(low, double.to(torch.bfloat16).double())


def test_the_targets_do_not_depend_on_the_batch_size(session):
    asked = Configuration.of(session.pipeline)
    assert torch.equal(drawn(session, asked), drawn(session, asked.with_(batch_size=asked.batch_size // 2)))


def test_a_second_sampling_seed_draws_independent_targets(session):
    asked = Configuration.of(session.pipeline)
    first, second = drawn(session, asked), drawn(session, changes.apply("sampling-seed:1", asked))
    assert first.shape == second.shape
    assert abs(torch.corrcoef(torch.stack([first.flatten(), second.flatten()]))[0, 1]) < 0.5


def test_without_the_seeded_draws_torch_gives_float32_and_float64_other_numbers():
    """The negative control: what the executor's draws correct."""
    torch.manual_seed(0)
    single = torch.randn(16, dtype=torch.float32)
    torch.manual_seed(0)
    double = torch.randn(16, dtype=torch.float64)
    assert not torch.allclose(single.double(), double, atol=1e-3)


@pytest.mark.parametrize(
    "draw",
    [
        lambda p: torch.normal(p, 1.0),
        lambda p: torch.normal(p, torch.ones_like(p)),
        lambda p: torch.randn_like(p),
        lambda p: torch.rand(p.shape, dtype=p.dtype),
        lambda p: torch.bernoulli(p.sigmoid()),
        lambda p: torch.multinomial(p.softmax(-1), 1),
        lambda p: torch.distributions.Categorical(logits=p).sample(),
        lambda p: torch.distributions.Normal(p, 1.0).sample(),
        lambda p: torch.empty_like(p).normal_(),
        lambda p: p.softmax(-1).multinomial(2),
    ],
    ids=[
        "normal",
        "normal-tensor-std",
        "randn_like",
        "rand",
        "bernoulli",
        "multinomial",
        "categorical",
        "distribution",
        "normal_",
        "method-multinomial",
    ],
)
def test_every_way_a_task_samples_is_drawn_alike_in_both_dtypes(draw):
    logits = torch.linspace(-2, 2, 8 * 5).reshape(8, 5)

    def sample(dtype: torch.dtype, batch: int) -> torch.Tensor:
        parts = []
        with sampling.drawing(seed=7):
            for start in range(0, 8, batch):
                with sampling.sampled_batch(batch):
                    parts.append(draw(logits[start : start + batch].to(dtype)).double())
        return torch.cat(parts)

    single, double, halves = sample(torch.float32, 8), sample(torch.float64, 8), sample(torch.float64, 4)
    assert torch.allclose(single, double, atol=1e-5)
    assert torch.equal(double, halves)
    assert torch.randn is sampling.ORIGINAL["randn"] and torch.multinomial is sampling.ORIGINAL["multinomial"]


def test_outside_a_stage_the_task_draws_from_torch_as_usual():
    with sampling.sampled_batch(4):
        torch.manual_seed(3)
        inside = torch.randn(4)
    torch.manual_seed(3)
    assert torch.equal(inside, torch.randn(4))
