"""Coverage on a real Hugging Face GPT-2 (built from a small config, nothing downloaded): its attention and
MLP projections are `Conv1D`, which kronfluence does not track; replaced by equivalent `nn.Linear`s, the
blocks are tracked and the warning is gone."""

from __future__ import annotations

import pytest
import torch
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from influence_doctor import Pipeline, diagnose

pytest.importorskip("transformers")  # a dev dependency (pyproject's dev extra): installed in CI

SEQUENCE, VOCAB = 16, 64


class CausalLanguageModeling(Task):
    """Summed next-token cross-entropy; sampled targets drawn from the model's own distribution."""

    def compute_train_loss(self, batch, model, sample=False):
        logits = model(input_ids=batch[0]).logits[:, :-1].reshape(-1, VOCAB)
        targets = batch[0][:, 1:].reshape(-1)
        if sample:
            with torch.no_grad():
                targets = torch.multinomial(F.softmax(logits.detach(), dim=-1), 1).squeeze(-1)
        return F.cross_entropy(logits, targets, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model, sample=False)


def gpt2(linear: bool = False) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQUENCE))
    if linear:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Conv1D):
                    setattr(parent, name, as_linear(child))
    return model.eval()


def as_linear(conv: nn.Module) -> nn.Linear:
    """Conv1D computes x @ W + b with W of shape (in, out): an nn.Linear with the weight transposed."""
    inputs, outputs = conv.weight.shape
    linear = nn.Linear(inputs, outputs)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    return linear


def tokens(count: int, seed: int) -> TensorDataset:
    return TensorDataset(torch.randint(0, VOCAB, (count, SEQUENCE), generator=torch.Generator().manual_seed(seed)))


def pipeline(linear: bool) -> Pipeline:
    return Pipeline(
        name="gpt2-linear" if linear else "gpt2",
        model=lambda: gpt2(linear),
        task=CausalLanguageModeling(),
        train_dataset=tokens(32, seed=0),
        query_dataset=tokens(4, seed=1),
        factor_args=FactorArguments(strategy="ekfac"),
        score_args=ScoreArguments(),
        scores=("self",),
        batch_size=8,
        query_batch_size=4,
    )


def test_the_linear_replacement_computes_the_same_function():
    ids = tokens(2, seed=3).tensors[0]
    assert torch.allclose(gpt2()(input_ids=ids).logits, gpt2(linear=True)(input_ids=ids).logits, atol=1e-5)


def test_conv1d_is_named_as_invisible_and_linear_projections_are_tracked(tmp_path):
    as_built = diagnose(pipeline(linear=False), fix=False, out_dir=tmp_path, progress=False, probe_examples=0)
    (warning,) = [f for f in as_built.findings if f.check == "train.coverage"]
    assert (warning.severity, warning.cause, warning.subject) == ("warn", "untracked-modules", "Conv1D")
    assert "nn.Linear" in warning.message and "8 Conv1D modules" in warning.message
    coverage = as_built.run.stages["train"].metrics["coverage"]
    assert coverage["untracked_by_type"]["Conv1D"]["modules"] == 8  # 2 blocks × (c_attn, c_proj, c_fc, c_proj)
    assert coverage["tracked_modules"] == ["lm_head"]
    assert as_built.status == "healthy"  # a warning about what the scores mean, not a numerical failure

    replaced = diagnose(pipeline(linear=True), fix=False, out_dir=tmp_path, progress=False, probe_examples=0)
    assert not [f for f in replaced.findings if f.check == "train.coverage"]
    tracked = replaced.run.stages["train"].metrics["tracked_modules"]
    for block in range(2):
        for projection in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            assert f"transformer.h.{block}.{projection}" in tracked
    after = replaced.run.stages["train"].metrics["coverage"]
    assert after["tracked_share"] > 0.5 > coverage["tracked_share"]
    assert set(after["untracked_by_type"]) <= {"Embedding", "LayerNorm"}
    assert after["never_called"] == []
