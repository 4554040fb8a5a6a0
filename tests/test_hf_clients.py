"""Hugging Face clients as their authors write them: a tokenised dataset without a torch format (dicts
of python lists) batched by `transformers.default_data_collator` through `Pipeline.dataloader_kwargs`,
a GPT-2 whose Conv1D layers are Linear (so kronfluence tracks them), per-token and per-module scores."""

from __future__ import annotations

import pytest
import torch
from kronfluence.arguments import FactorArguments, ScoreArguments
from torch.nn import functional as F

from influence_doctor import Pipeline, diagnose
from tests.test_coverage_hf import SEQUENCE, VOCAB, gpt2

pytest.importorskip("transformers")


class HFDataset(torch.utils.data.Dataset):
    """What `datasets.Dataset.map(tokenize)` yields without `set_format("torch")`: dicts of python lists."""

    def __init__(self, count: int, seed: int) -> None:
        ids = torch.randint(0, VOCAB, (count, SEQUENCE), generator=torch.Generator().manual_seed(seed))
        self.rows = [{"input_ids": row.tolist(), "attention_mask": [1] * SEQUENCE} for row in ids]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.rows[index]


class LanguageModelingTask:
    """kronfluence's WikiText example, in short: summed next-token cross-entropy on the collated dict."""

    def compute_train_loss(self, batch, model, sample=False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].reshape(-1, VOCAB).float()
        targets = batch["input_ids"][:, 1:].reshape(-1)
        if sample:
            with torch.no_grad():
                targets = torch.multinomial(F.softmax(logits.detach(), dim=-1), 1).squeeze(-1)
        return F.cross_entropy(logits, targets, reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def get_influence_tracked_modules(self):
        return None

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


def _task():
    from kronfluence.task import Task

    return type("HFLanguageModeling", (LanguageModelingTask, Task), {})()


def hf_pipeline(name: str = "hf-gpt2", **score_options) -> Pipeline:
    from transformers import default_data_collator

    return Pipeline(
        name=name,
        model=lambda: gpt2(linear=True),
        task=_task(),
        train_dataset=HFDataset(48, seed=0),
        query_dataset=HFDataset(4, seed=1),
        factor_args=FactorArguments(strategy="ekfac"),
        score_args=ScoreArguments(**score_options),
        scores=("pairwise",),
        batch_size=16,
        query_batch_size=4,
        dataloader_kwargs={"collate_fn": default_data_collator},
    )


def test_a_tokenised_dataset_batched_by_the_users_collator_is_diagnosed(tmp_path):
    report = diagnose(hf_pipeline(), out_dir=tmp_path, progress=False)
    assert report.status == "healthy", [f.message for f in report.findings if f.severity != "info"]
    assert report.document["scores"]["pairwise"]["shape"] == [4, 48]
    coverage = next(s for s in report.document["stages"] if s["name"] == "train")["metrics"]["coverage"]
    assert coverage.get("error") is None  # the doctor's own pass collated the dicts as the user does


def test_a_pipeline_without_the_collator_fails_clearly_not_silently():
    with pytest.raises(ValueError, match="DataLoaderKwargs"):
        Pipeline(name="x", model=None, task=None, train_dataset=[], query_dataset=[], dataloader_kwargs=3)
    with pytest.raises(ValueError, match="collate"):
        Pipeline(name="x", model=None, task=None, train_dataset=[], query_dataset=[], dataloader_kwargs={"collate": 1})


def test_per_token_scores_are_checked_and_reported(tmp_path):
    """Per-token and per-module scores: rankings, checks and the report work on scores summed over tokens
    and modules; the largest token score is located; the user's ScoreArguments stay as written (kronfluence
    switches per-token off in the arguments it computes self-influence with)."""
    pipeline = hf_pipeline("hf-gpt2-tokens", compute_per_token_scores=True, compute_per_module_scores=True)
    pipeline.scores = ("pairwise", "self")
    report = diagnose(pipeline, out_dir=tmp_path, progress=False)
    assert report.status == "healthy", [f.message for f in report.findings if f.severity != "info"]
    assert pipeline.score_args.compute_per_token_scores is True
    pairwise = report.document["scores"]["pairwise"]
    assert pairwise["shape"] == [4, 48] and pairwise["tokens"] == 16
    assert report.document["scores"]["self"]["shape"] == [48]
    per_module = report.run.artifacts["pairwise_scores"]
    assert len(per_module) > 1 and next(iter(per_module.values())).shape == (4, 48, 16)
    top = report.document["scores"]["top_influences"][0]["top"][0]
    from influence_doctor.checks.scores import total_scores

    summed = total_scores(per_module)
    assert top["score"] == pytest.approx(float(summed[0].max()), rel=1e-5)
    stage = next(s for s in report.document["stages"] if s["name"] == "pairwise_scores")
    located = stage["metrics"]["checks"]["pairwise"]["per_token"]
    assert located["tokens"] == 16 and located["largest_at"].startswith("query ")
    assert report.document["fidelity"]["float64"]["pairwise"]["median_spearman"] > 0.99  # probes on summed scores


def test_low_rank_query_gradients_report_their_cost_as_info(tmp_path):
    """query_gradient_low_rank is the user's approximation: its cost against full rank, measured on the
    probe, is `info` and never changes the verdict."""
    pipeline = hf_pipeline("hf-gpt2-low-rank", query_gradient_low_rank=2)
    report = diagnose(pipeline, out_dir=tmp_path, progress=False, fix=False)
    (finding,) = [f for f in report.findings if f.check == "scores.low_rank_cost"]
    assert not any("scores.low_rank_cost" in [f.check for f in p.evidence] for p in report.problems)
    assert finding.severity == "info" and "at rank 2" in finding.message
    measured = report.run.probes["low_rank"]["pairwise"]["median_spearman"]
    assert finding.value == measured and -1.0 <= measured < 1.0  # rank 2 of 16-dimensional layers loses something


class MaskedMeanLanguageModeling(LanguageModelingTask):
    """A causal-LM loss averaged over each example's unmasked tokens, summed over examples: 0/0 = NaN for
    an example whose mask is empty."""

    def compute_train_loss(self, batch, model, sample=False):
        mask = batch["attention_mask"].float()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        losses = F.cross_entropy(logits.reshape(-1, VOCAB), batch["input_ids"][:, 1:].reshape(-1), reduction="none")
        losses = losses.view(len(mask), -1) * mask[:, 1:]
        return (losses.sum(dim=1) / mask[:, 1:].sum(dim=1)).sum()


def test_fully_masked_examples_are_named_with_the_fix(tmp_path):
    from kronfluence.task import Task

    dataset = HFDataset(32, seed=0)
    for index in (3, 7):
        dataset.rows[index]["attention_mask"] = [0] * SEQUENCE
    pipeline = hf_pipeline("hf-gpt2-masked")
    pipeline.task = type("Masked", (MaskedMeanLanguageModeling, Task), {})()
    pipeline.train_dataset = dataset
    report = diagnose(pipeline, out_dir=tmp_path, progress=False, fix=False, probe_examples=0)
    (finding,) = [f for f in report.findings if f.check == "task.examples_finite"]
    assert (finding.severity, finding.cause, finding.value) == ("fail", "nonfinite-examples", 2.0)
    assert "indices 3, 7" in finding.message and "scores them 0" in finding.message
    assert ("nonfinite-examples", "train") in {(p.cause, p.stage) for p in report.problems}


def test_per_token_scores_summed_over_tokens_are_kronfluences_own_scores_without_per_token(tmp_path):
    """The scores the doctor reads (`total_scores`: summed over tokens and modules) against kronfluence's own
    scores of the same model and factors computed without per-token scores, to float32's √eps (the two
    differ only in the order of the sums). The sampled targets are drawn per example from the seed, so both
    runs fit the same factors."""
    import math

    from influence_doctor.checks.measures import relative_frobenius
    from influence_doctor.checks.scores import total_scores

    pipeline = hf_pipeline("hf-gpt2-per-token", compute_per_token_scores=True)
    tokens = diagnose(pipeline, out_dir=tmp_path / "t", progress=False)
    plain = diagnose(hf_pipeline("hf-gpt2-summed"), out_dir=tmp_path / "p", progress=False)
    per_token, own = tokens.run.artifacts["pairwise_scores"], plain.run.artifacts["pairwise_scores"]
    assert next(iter(per_token.values())).shape == (4, 48, 16) and next(iter(own.values())).shape == (4, 48)
    summed, reference = total_scores(per_token).double(), total_scores(own).double()
    assert summed.shape == reference.shape == (4, 48)
    assert relative_frobenius(summed - reference, reference) < math.sqrt(torch.finfo(torch.float32).eps)
