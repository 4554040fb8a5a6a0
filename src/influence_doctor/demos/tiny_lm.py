"""`tiny-lm`: the seeds' scenario. A small post-LN decoder-only transformer built from nn.Linear layers,
trained on the bundled question-and-answer corpus, analysed with fp16 covariances and default damping.

The embeddings are scaled by sqrt(d_model) as in the original transformer, so the residual stream that
feeds the first attention projections carries values of order ten: summed over ~15k tokens, the fp16
activation covariance passes 65504 and becomes inf, and eigendecomposition fails or returns garbage.
"""

from __future__ import annotations

import math

import torch
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from influence_doctor.demos.corpus import QUERIES, tokenize, training_examples
from influence_doctor.pipeline import Pipeline, TrainingMonitor

PAD, BOS, EOS = 0, 1, 2
IGNORE = -100
MAX_LEN = 40
SPECIALS = ("<pad>", "<bos>", "<eos>")


class Vocabulary:
    """Word-level vocabulary over the corpus and the queries, built deterministically."""

    def __init__(self, texts: list[str]) -> None:
        words = sorted({token for text in texts for token in tokenize(text)})
        self.itos = [*SPECIALS, *words]
        self.stoi = {word: index for index, word in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi[token] for token in tokenize(text)]


def _encode_pairs(vocab: Vocabulary, pairs: list[tuple[str, str]], answer_only: bool) -> TensorDataset:
    """Tokens `<bos> q : ... a : ... <eos>`; labels mask padding, and the question when `answer_only`."""
    input_ids = torch.full((len(pairs), MAX_LEN), PAD, dtype=torch.long)
    labels = torch.full((len(pairs), MAX_LEN), IGNORE, dtype=torch.long)
    for row, (question, answer) in enumerate(pairs):
        prompt = [BOS, *vocab.encode("q : " + question + " a :")]
        ids = ([*prompt, *vocab.encode(answer), EOS])[:MAX_LEN]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(ids)
        if answer_only:
            labels[row, : len(prompt)] = IGNORE
    return TensorDataset(input_ids, labels)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        heads = lambda t: t.view(batch, length, self.n_heads, width // self.n_heads).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(attended.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Post-LN block, as in the original transformer."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln1 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.ln2 = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab_size: int, d_model: int = 64, n_heads: int = 4, n_layers: int = 2) -> None:
        super().__init__()
        self.d_model = d_model
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=1.0)
        self.pos = nn.Embedding(MAX_LEN, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, 4 * d_model) for _ in range(n_layers))
        self.lm_head = nn.Linear(d_model, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.embed(input_ids) * math.sqrt(self.d_model) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x)


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)


class LanguageModelingTask(Task):
    """Summed next-token loss for training; the answer's log-likelihood as the measurement."""

    def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
        input_ids, labels = batch
        logits, targets = _shifted(model(input_ids).float(), labels)
        if sample:
            with torch.no_grad():
                sampled = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1).flatten()
            targets = torch.where(targets == IGNORE, targets, sampled)
        return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")

    def compute_measurement(self, batch, model: nn.Module) -> torch.Tensor:
        input_ids, labels = batch
        logits, targets = _shifted(model(input_ids).float(), labels)
        return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")

    def get_influence_tracked_modules(self):
        return None  # every nn.Linear: attention projections, MLPs and the LM head

    def get_attention_mask(self, batch) -> torch.Tensor:
        return (batch[0] != PAD).long()


def train_tiny_lm(
    model: nn.Module, dataset: TensorDataset, monitor: TrainingMonitor, *, epochs: int = 4, lr: float = 3e-3
) -> None:
    """Plain AdamW with a short warmup; logs loss per step and a held-out loss every few steps."""
    generator = torch.Generator().manual_seed(0)
    holdout = torch.arange(len(dataset)) % 10 == 0
    train_idx, val_idx = torch.nonzero(~holdout).flatten(), torch.nonzero(holdout).flatten()
    val_idx = val_idx.to(next(model.parameters()).device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    total_steps = epochs * math.ceil(len(train_idx) / 32)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.1)
    device = next(model.parameters()).device
    input_ids, labels = (tensor.to(device) for tensor in dataset.tensors)
    model.train()
    for _epoch in range(epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=generator)].to(device)
        for start in range(0, len(order), 32):
            rows = order[start : start + 32]
            logits, targets = _shifted(model(input_ids[rows]), labels[rows])
            loss = F.cross_entropy(logits, targets, ignore_index=IGNORE)
            optimizer.zero_grad()
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            optimizer.step()
            schedule.step()
            validation = None
            if len(monitor.loss) % 10 == 0:
                with torch.no_grad():
                    v_logits, v_targets = _shifted(model(input_ids[val_idx]), labels[val_idx])
                    validation = F.cross_entropy(v_logits, v_targets, ignore_index=IGNORE)
            monitor.log(loss, validation_loss=validation, grad_norm=grad_norm)
    model.eval()


def tiny_lm(examples: int = 1000) -> Pipeline:
    """The default demo, configured the way the seeds' user had it: fp16 covariances, default damping."""
    corpus = training_examples(examples)
    pairs = [(question, answer) for _domain, question, answer in corpus]
    vocab = Vocabulary([q + " " + a for q, a in pairs] + [q + " " + a for q, a in QUERIES] + ["q : a :"])
    train_dataset = _encode_pairs(vocab, pairs, answer_only=False)
    query_dataset = _encode_pairs(vocab, list(QUERIES), answer_only=True)

    def build_model() -> nn.Module:
        return TinyLM(len(vocab))

    return Pipeline(
        name="tiny-lm",
        model=build_model,
        task=LanguageModelingTask(),
        train_dataset=train_dataset,
        query_dataset=query_dataset,
        train=train_tiny_lm,
        factor_args=FactorArguments(
            strategy="ekfac",
            activation_covariance_dtype=torch.float16,
            gradient_covariance_dtype=torch.float16,
        ),
        score_args=ScoreArguments(),  # damping_factor=1e-08, kronfluence's default
        scores=("pairwise", "self"),
        batch_size=64,
        query_batch_size=8,
        seed=0,
        query_labels=[q for q, _ in QUERIES],
        train_labels=[f"{q} {a}" for q, a in pairs],
    )
