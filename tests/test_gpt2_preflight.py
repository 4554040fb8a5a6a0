"""GPT-2 small's real shape is stopped by the pre-flight before the user's training: its `lm_head` (tied to
`transformer.wte`) has a 50,257² gradient covariance, past the eigensolver's 32-bit limit at any memory
budget, and past the host's memory at the default one. Nothing is trained or fitted, and the report says
why. A tiny GPT-2 of the same build, its head tied too, goes through. Behaviour only: no timing is held."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from kronfluence.arguments import FactorArguments, ScoreArguments
from torch import nn

from influence_doctor import Pipeline, TrainingMonitor, diagnose
from influence_doctor.checks.sizes import certain_bytes
from influence_doctor.runner.memory import device_memory_bytes
from tests.modern_models import (
    LM_VOCAB,
    SummedLanguageModeling,
    counting_tokens,
    gpt2_small_shape,
    linearise,
    train_lora,
)

pytest.importorskip("transformers")

INFLUENCE_STAGES = ("covariance", "eigendecomposition", "lambda", "pairwise_scores", "self_scores")
HUNDRED_GB = 1e11


def recording(pipeline: Pipeline, calls: list[str], train: Any = None) -> Pipeline:
    """`pipeline` with a training loop that records that it ran (then runs `train`, if any): the pre-flight
    must stop the run before the user's loop, not merely in a pipeline that has none."""

    def loop(model: nn.Module, dataset: Any, monitor: TrainingMonitor) -> None:
        calls.append("train")
        if train is not None:
            train(model, dataset, monitor)

    return dataclasses.replace(pipeline, train=loop)


def stopped_before_training(report: Any, calls: list[str]) -> dict[str, Any]:
    """What every budget shows on GPT-2 small: sick, nothing trained or fitted, `lm_head` past the solver's
    limit and its tie to `wte` named. Returns the pre-flight's record."""
    assert report.status == "sick"
    stages = {stage["name"]: stage for stage in report.document["stages"]}
    train = stages["train"]
    assert train["status"] == "fail" and train["error"] is None  # the pre-flight's findings, not a crash
    assert train["calls"] == [] and calls == []
    assert train["reason"].startswith("pre-flight: lm_head cannot be factored as configured")
    assert "neither trained nor analysed" in train["reason"]
    assert train["metrics"]["trained"] is False and report.run.session.evidence.trained is False
    for name in INFLUENCE_STAGES:
        assert stages[name]["status"] == "not-run" and stages[name]["calls"] == []
        assert stages[name]["reason"].startswith("pre-flight: lm_head")
    (solver,) = [f for f in report.findings if f.check == "preflight.solver_limit"]
    assert (solver.severity, solver.subject, solver.value, solver.limit) == ("fail", "lm_head", 50_257.0, 46_340.0)
    assert "50257×50257" in solver.message and "2³¹" in solver.message
    (tied,) = [f for f in report.findings if f.check == "preflight.tied_weights"]
    assert (tied.severity, tied.cause, tied.subject) == ("warn", "shared-parameters", "lm_head")
    assert "lm_head" in tied.message and "transformer.wte" in tied.message
    record = train["metrics"]["preflight"]
    assert record["tied"] == {"lm_head": ["transformer.wte"]}
    assert record["modules"]["lm_head"]["gradient"] == 50_257
    return record


@pytest.mark.slow
def test_gpt2_small_is_stopped_by_the_solver_limit_even_with_100_gb(tmp_path):
    """With 100 GB every module's counted bytes fit (about 51 GB for `lm_head`'s eigendecomposition beside
    the covariances), yet `lm_head` still cannot be eigendecomposed: the solver's limit is the only fail."""
    calls: list[str] = []
    pipeline = recording(gpt2_small_shape(), calls)
    report = diagnose(pipeline, out_dir=tmp_path, progress=False, memory_budget=HUNDRED_GB)
    record = stopped_before_training(report, calls)
    assert record["budget_bytes"] == int(HUNDRED_GB)
    assert certain_bytes(record, "lm_head") < HUNDRED_GB
    assert {f.check for f in report.findings if f.severity == "fail"} == {"preflight.solver_limit"}
    assert not [f for f in report.findings if f.check == "preflight.memory"]


@pytest.mark.slow
def test_gpt2_small_at_the_default_budget_is_over_the_hosts_memory_too(tmp_path):
    """The default budget is the host's memory. `lm_head`'s counted bytes (its 10 GB float32 covariance and
    40 GB of float64 matrix and eigenvectors, about 51 GB) exceed it on any host with less, so
    `preflight.memory` fails beside the solver's limit; on a larger host it must not."""
    calls: list[str] = []
    pipeline = recording(gpt2_small_shape(), calls)
    report = diagnose(pipeline, out_dir=tmp_path, progress=False)
    record = stopped_before_training(report, calls)
    assert record["budget_bytes"] == device_memory_bytes("cpu")
    memory = [f for f in report.findings if f.check == "preflight.memory" and f.severity == "fail"]
    if certain_bytes(record, "lm_head") > record["budget_bytes"]:
        assert [(f.subject, f.cause) for f in memory] == [("lm_head", "out-of-memory")]
        assert "50257×50257" in memory[0].message
        assert {f.check for f in report.findings if f.severity == "fail"} == {
            "preflight.memory",
            "preflight.solver_limit",
        }
    else:
        assert memory == []


def build_tiny_gpt2_linear() -> nn.Module:
    """One layer, n_embd 32, vocabulary 96, dropout off, Conv1D replaced by Linear; `lm_head` tied to
    `transformer.wte` as in GPT-2 small."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1,
        n_embd=32,
        n_head=2,
        vocab_size=LM_VOCAB,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return linearise(GPT2LMHeadModel(config)).eval()


def test_a_tiny_gpt2_with_its_head_tied_is_not_stopped(tmp_path):
    """The negative control: the same build at a 96-token vocabulary fits the solver and the memory. The
    user's loop runs, the factors are fitted, and only the tie is named by the pre-flight."""
    calls: list[str] = []
    pipeline = Pipeline(
        name="tiny-gpt2-tied",
        model=build_tiny_gpt2_linear,
        task=SummedLanguageModeling(LM_VOCAB),
        train_dataset=counting_tokens(64, seed=1),
        query_dataset=counting_tokens(4, seed=2),
        train=None,
        factor_args=FactorArguments(strategy="ekfac"),
        score_args=ScoreArguments(),
        scores=("pairwise",),
        batch_size=16,
        query_batch_size=4,
    )
    pipeline = recording(pipeline, calls, lambda model, data, monitor: train_lora(model, data, monitor, epochs=1))
    report = diagnose(pipeline, out_dir=tmp_path, progress=False, fix=False, probe_examples=8)
    assert calls == ["train"]
    stages = {stage["name"]: stage for stage in report.document["stages"]}
    assert stages["train"]["calls"] == ["train"] and stages["train"]["metrics"]["trained"] is True
    assert report.run.session.evidence.trained is True
    assert "pre-flight" not in (stages["train"]["reason"] or "")
    assert report.run.session.preflight_blocked == []
    preflight = {f.check for f in report.findings if f.check.startswith("preflight.")}
    assert "preflight.solver_limit" not in preflight and "preflight.memory" not in preflight
    assert "preflight.tied_weights" in preflight
    assert stages["covariance"]["status"] not in ("not-run", "skipped") and stages["covariance"]["calls"]
    assert stages["pairwise_scores"]["status"] not in ("not-run", "skipped")
