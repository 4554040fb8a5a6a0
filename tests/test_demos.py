"""The built-in demos: tiny-lm genuinely breaks as in the seeds; uci-mlp and conv are healthy."""

from __future__ import annotations

import pytest
import torch

from influence_doctor import diagnose
from influence_doctor.demos import DEMOS, load_demo
from influence_doctor.demos.corpus import FACTS, QUERIES, training_examples
from influence_doctor.errors import UsageError


def test_corpus_is_about_a_thousand_examples_across_three_domains():
    examples = training_examples()
    assert len(examples) == 1000
    assert {domain for domain, _, _ in examples} == {"economics", "history", "science"}
    assert len(set(examples)) == len(examples)
    assert training_examples() == examples  # deterministic
    assert any(question.startswith("what is inflation") for question, _ in QUERIES)
    assert any("first president" in question for question, _ in QUERIES)
    assert len(FACTS) >= 90


def test_unknown_demo_is_a_usage_error():
    with pytest.raises(UsageError, match="tiny-lm, uci-mlp, conv"):
        load_demo("gpt-5")
    assert set(DEMOS) == {"tiny-lm", "uci-mlp", "conv"}


@pytest.mark.slow
def test_tiny_lm_breaks_without_the_doctor(tmp_path):
    """The seeds' failure, for real: fp16 covariance sums overflow to inf and the scores are garbage."""
    report = diagnose(load_demo("tiny-lm"), fix=False, out_dir=tmp_path, examples=400, progress=False)
    run = report.run
    # The model trained: the loss fell.
    assert run.monitor.loss[-1] < 0.5 * run.monitor.loss[0]
    covariance = run.artifacts["covariance"]["activation_covariance"]
    assert covariance["blocks.0.attn.q_proj"].dtype == torch.float16
    assert torch.isinf(covariance["blocks.0.attn.q_proj"]).any()
    stages = {stage["name"]: stage for stage in report.document["stages"]}
    eigh_raised = stages["eigendecomposition"]["status"] == "error"
    if eigh_raised:  # LAPACK may refuse the inf matrix outright ...
        assert "linalg.eigh" in stages["eigendecomposition"]["error"]["message"]
    else:  # ... or, on CPU, "succeed" and hand back NaN that poisons every score downstream.
        assert report.document["scores"]["self"]["finite_fraction"] < 1.0
        assert report.document["scores"]["pairwise"]["finite_fraction"] < 1.0
    assert report.status == "sick"


@pytest.mark.slow
def test_uci_mlp_demo_is_healthy(tmp_path):
    report = diagnose(load_demo("uci-mlp"), out_dir=tmp_path, progress=False)
    assert report.status == "healthy", [(f.check, f.subject, f.message) for f in report.findings]
    assert [f for f in report.findings if f.severity == "fail"] == []


@pytest.mark.slow
def test_conv_demo_is_healthy(tmp_path):
    report = diagnose(load_demo("conv"), out_dir=tmp_path, progress=False)
    assert report.status == "healthy", report.findings
    assert [f for f in report.findings if f.severity == "fail"] == []  # false alarms are bugs
    assert report.run.monitor.loss[-1] < report.run.monitor.loss[0]
    assert report.document["scores"]["self"]["finite_fraction"] == 1.0
