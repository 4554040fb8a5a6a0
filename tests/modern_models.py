"""Pipelines built the way people build models today (issue 24, SPEC §4.0): a module applied several times
per forward, activation checkpointing in both modes, `torch.compile`, PyTorch's own `nn.TransformerEncoder`,
a model that is a bare `nn.Linear`, a PEFT LoRA fine-tune of a Hugging Face GPT-2, GPT-2 small's real shape
and a small classifier at kronfluence's defaults (true Fisher) and with the empirical Fisher.

Every factory takes no argument and returns a deterministic, seeded `Pipeline`; each construct has its
negative control beside it (same seed, same weights, the construct removed). Nothing is downloaded: the
GPT-2s are built from configs. No tests here; `tests/test_modern_models.py` checks the factories.
"""

from __future__ import annotations

import copy

import torch
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.data import TensorDataset

from influence_doctor import Pipeline, TrainingMonitor
from influence_doctor.demos.training import train_minibatches
from influence_doctor.demos.uci_mlp import FEATURES, RegressionTask, synthetic_regression

WIDTH = 16
STEPS = 3
"""How many times the unrolled block applies its cell."""
EXAMPLES, QUERIES, BATCH = 128, 8, 32


def construct_factors() -> FactorArguments:
    """The construct pipelines use the empirical Fisher, so that nothing in them moves with the sampling seed:
    what they test is the hooks and the coverage, not `fisher-sampling-noise` (the classifiers below do)."""
    return FactorArguments(strategy="ekfac", use_empirical_fisher=True)


def construct_scores() -> ScoreArguments:
    return ScoreArguments(damping_factor=None)  # kronfluence's heuristic: 0.1 x mean eigenvalue


# ---------------------------------------------------------------------------------------------------------
# Tasks


class ClassificationTask(Task):
    """Summed cross-entropy; labels sampled from the model's softmax for the true Fisher."""

    def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
        inputs, labels = batch
        logits = model(inputs)
        if sample:
            with torch.no_grad():
                labels = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1).flatten()
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch, model: nn.Module) -> torch.Tensor:
        return self.compute_train_loss(batch, model, sample=False)


class SummedLanguageModeling(Task):
    """Next-token cross-entropy summed over tokens and examples (kronfluence's WikiText example, in short);
    sampled targets drawn from the model's own distribution. `tracked` is the optional module list."""

    def __init__(self, vocab: int, tracked: list[str] | None = None) -> None:
        self.vocab = vocab
        self.tracked = tracked

    def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
        input_ids = batch[0]
        logits = model(input_ids=input_ids).logits[:, :-1].reshape(-1, self.vocab).float()
        targets = input_ids[:, 1:].reshape(-1)
        if sample:
            with torch.no_grad():
                targets = torch.multinomial(F.softmax(logits.detach(), dim=-1), 1).squeeze(-1)
        return F.cross_entropy(logits, targets, reduction="sum")

    def compute_measurement(self, batch, model: nn.Module) -> torch.Tensor:
        return self.compute_train_loss(batch, model, sample=False)

    def get_influence_tracked_modules(self) -> list[str] | None:
        return self.tracked


def _regression_pipeline(name: str, model, train=None, **overrides) -> Pipeline:
    settings = dict(
        name=name,
        model=model,
        task=RegressionTask(),
        train_dataset=synthetic_regression(EXAMPLES, seed=1),
        query_dataset=synthetic_regression(QUERIES, seed=2),
        train=train if train is not None else train_regression,
        factor_args=construct_factors(),
        score_args=construct_scores(),
        scores=("pairwise", "self"),
        batch_size=BATCH,
        query_batch_size=QUERIES,
    )
    settings.update(overrides)
    return Pipeline(**settings)


def train_regression(model: nn.Module, dataset: TensorDataset, monitor: TrainingMonitor) -> None:
    """Eight epochs of Adam in batches of 32 (every batch the same shape, so a compiled model compiles once)."""
    train_minibatches(model, dataset, monitor, F.mse_loss, epochs=8, lr=1e-2, batch_size=BATCH)


# ---------------------------------------------------------------------------------------------------------
# A module applied several times per forward


class UnrolledBlock(nn.Module):
    """`inp`, then one residual block applied STEPS times, then `head`. Shared: one `cell` Linear is called
    STEPS times per forward. Unshared (the control): `cells.0`, `cells.1`, ... are distinct Linears of the
    same shape, each starting as a copy of the shared one, so both compute the same function before training."""

    def __init__(self, shared: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(FEATURES, WIDTH)
        cell = nn.Linear(WIDTH, WIDTH)
        if shared:
            self.cell = cell
        else:
            self.cells = nn.ModuleList(copy.deepcopy(cell) for _ in range(STEPS))
        self.head = nn.Linear(WIDTH, 1)

    def steps(self) -> list[nn.Module]:
        return [self.cell] * STEPS if hasattr(self, "cell") else list(self.cells)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for cell in self.steps():
            h = h + torch.tanh(cell(h))
        return self.head(h)


def shared_cell() -> Pipeline:
    """One Linear (`cell`) applied three times per forward; kronfluence at its default
    `has_shared_parameters=False`."""
    return _regression_pipeline("shared-cell", lambda: UnrolledBlock(shared=True))


def unshared_cell() -> Pipeline:
    """The control: three distinct Linears (`cells.0..2`) of the same shapes."""
    return _regression_pipeline("unshared-cell", lambda: UnrolledBlock(shared=False))


# ---------------------------------------------------------------------------------------------------------
# Activation checkpointing and torch.compile


class BlockMLP(nn.Module):
    """`inp` → `block` (Linear, Tanh, Linear, Tanh) → `head`. With `use_reentrant` True or False the block
    runs under `torch.utils.checkpoint.checkpoint` on every forward (not only in training, as many hand-written
    models do); None runs it plainly. Same seed, same weights in all three."""

    def __init__(self, use_reentrant: bool | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.use_reentrant = use_reentrant
        self.inp = nn.Linear(FEATURES, WIDTH)
        self.block = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh())
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        plain = self.use_reentrant is None
        h = self.block(h) if plain else checkpoint(self.block, h, use_reentrant=self.use_reentrant)
        return self.head(h)


def checkpointed(reentrant: bool) -> Pipeline:
    name = "checkpointed-reentrant" if reentrant else "checkpointed-nonreentrant"
    return _regression_pipeline(name, lambda: BlockMLP(use_reentrant=reentrant))


def checkpointed_nonreentrant() -> Pipeline:
    """`use_reentrant=False`: recomputes the block in backward; kronfluence's results must not change."""
    return checkpointed(reentrant=False)


def checkpointed_reentrant() -> Pipeline:
    """`use_reentrant=True`: the block's forward runs under no_grad; kronfluence's hooks cannot register."""
    return checkpointed(reentrant=True)


def uncheckpointed() -> Pipeline:
    """The control of both checkpointed pipelines: the same model run plainly."""
    return _regression_pipeline("uncheckpointed", lambda: BlockMLP(use_reentrant=None))


class TorchCompileUnavailable(RuntimeError):
    """torch.compile cannot run here (no C++ compiler for inductor, or dynamo unsupported): skip the test."""


def require_torch_compile() -> None:
    """Raises TorchCompileUnavailable where torch.compile's default (inductor) backend cannot compile on CPU."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise TorchCompileUnavailable("torch.compile (dynamo) is not supported on this Python/platform")
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as error:
        raise TorchCompileUnavailable(f"torch.compile's inductor backend has no C++ compiler here: {error}") from error


def build_compiled() -> nn.Module:
    return torch.compile(BlockMLP(use_reentrant=None))


def compiled() -> Pipeline:
    """The small MLP passed through `torch.compile` before it is returned: trained compiled, then prepared by
    kronfluence (which replaces its Linears: dynamo recompiles). Raises TorchCompileUnavailable where it
    cannot compile."""
    require_torch_compile()
    return _regression_pipeline("compiled", build_compiled)


def uncompiled() -> Pipeline:
    """The control of `compiled`: the same model, same seed, not compiled."""
    return _regression_pipeline("uncompiled", lambda: BlockMLP(use_reentrant=None))


# ---------------------------------------------------------------------------------------------------------
# PyTorch's own attention; a root module


SEQ_LEN, TOKEN_FEATURES, D_MODEL, CLASSES = 6, 4, 16, 3


def sequence_classes(count: int, seed: int) -> TensorDataset:
    """Sequences of 6 tokens of 4 features; the class is the feature (of the first 3) with the largest sum
    over the sequence, so it needs the whole sequence; 10% of labels flipped at random."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, SEQ_LEN, TOKEN_FEATURES, generator=generator)
    labels = x[:, :, :CLASSES].sum(dim=1).argmax(dim=1)
    flip = torch.rand(count, generator=generator) < 0.1
    labels = torch.where(flip, torch.randint(0, CLASSES, (count,), generator=generator), labels)
    return TensorDataset(x, labels)


class EncoderClassifier(nn.Module):
    """`embed` Linear → one `nn.TransformerEncoderLayer` (its `self_attn` is an `nn.MultiheadAttention`:
    `in_proj_weight` a bare parameter, `out_proj` a `NonDynamicallyQuantizableLinear`) → mean pool → `head`."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(TOKEN_FEATURES, D_MODEL)
        layer = nn.TransformerEncoderLayer(D_MODEL, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(D_MODEL, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


def train_classifier(model: nn.Module, dataset: TensorDataset, monitor: TrainingMonitor, epochs: int = 10) -> None:
    train_minibatches(model, dataset, monitor, F.cross_entropy, epochs=epochs, lr=1e-2, batch_size=BATCH)


def transformer_encoder() -> Pipeline:
    """A tiny `nn.TransformerEncoder` with a linear head, classifying sequences."""
    return Pipeline(
        name="transformer-encoder",
        model=EncoderClassifier,
        task=ClassificationTask(),
        train_dataset=sequence_classes(EXAMPLES, seed=1),
        query_dataset=sequence_classes(QUERIES, seed=2),
        train=train_classifier,
        factor_args=construct_factors(),
        score_args=construct_scores(),
        scores=("pairwise", "self"),
        batch_size=BATCH,
        query_batch_size=QUERIES,
    )


def build_bare_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(FEATURES, 1)


def bare_linear() -> Pipeline:
    """The model is one `nn.Linear`: a root module with no parent for kronfluence to set its wrapper on."""
    return _regression_pipeline("bare-linear", build_bare_linear)


def wrapped_linear() -> Pipeline:
    """The control (and the fix): the same Linear inside an `nn.Sequential`."""
    return _regression_pipeline("wrapped-linear", lambda: nn.Sequential(build_bare_linear()))


# ---------------------------------------------------------------------------------------------------------
# Hugging Face GPT-2: a PEFT LoRA fine-tune, and GPT-2 small's real shape


LM_VOCAB, LM_SEQUENCE, LM_POSITIONS = 96, 16, 32
LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]
"""Every attention and MLP projection of a GPT-2 block (`c_proj` names both the attention's and the MLP's)."""


def as_linear(conv: nn.Module) -> nn.Linear:
    """Conv1D computes x @ W + b with W of shape (in, out): an nn.Linear with the weight transposed."""
    inputs, outputs = conv.weight.shape
    linear = torch.nn.utils.skip_init(nn.Linear, inputs, outputs, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    return linear


def linearise(model: nn.Module) -> nn.Module:
    """Replaces GPT-2's Conv1D layers by equivalent `nn.Linear`s (kronfluence tracks Linear, not Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    targets = [name for name, module in model.named_modules() if isinstance(module, Conv1D)]
    for target in targets:  # one at a time, so that only one layer is held twice (GPT-2 small: 85M weights)
        parent_name, _, name = target.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, name, as_linear(getattr(parent, name)))
    return model


def build_tiny_gpt2() -> nn.Module:
    """A 2-layer GPT-2 (n_embd 32) from a config, dropout off, Conv1D replaced by Linear; `lm_head` is tied
    to `transformer.wte` as in every GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=LM_VOCAB,
        n_positions=LM_POSITIONS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return linearise(GPT2LMHeadModel(config)).eval()


def build_lora_gpt2() -> nn.Module:
    """The tiny GPT-2 wrapped by PEFT LoRA (r=4) on every attention and MLP projection: only the `lora_A` and
    `lora_B` Linears train; the `base_layer`s, embeddings, LayerNorms and the tied head are frozen."""
    from peft import LoraConfig, get_peft_model

    model = build_tiny_gpt2()
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, config).eval()


def counting_tokens(count: int, seed: int, vocab: int = LM_VOCAB, length: int = LM_SEQUENCE) -> TensorDataset:
    """Sequences that count up modulo the vocabulary from a random start by a random step of 1, 2 or 3:
    something a fine-tune can learn."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (count, 1), generator=generator)
    step = torch.randint(1, 4, (count, 1), generator=generator)
    return TensorDataset((start + step * torch.arange(length)) % vocab)


def train_lora(model: nn.Module, dataset: TensorDataset, monitor: TrainingMonitor, epochs: int = 4) -> None:
    """AdamW on the parameters that require grad (the adapters), mean next-token loss, batches of 16."""
    task = SummedLanguageModeling(LM_VOCAB)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-2, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    (input_ids,) = dataset.tensors
    tokens = input_ids[:, 1:].numel() // len(input_ids)
    model.train()
    for _epoch in range(epochs):
        order = torch.randperm(len(input_ids), generator=generator)
        for start in range(0, len(order), 16):
            rows = order[start : start + 16]
            loss = task.compute_train_loss((input_ids[rows],), model) / (len(rows) * tokens)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.log(loss)
    model.eval()


def lora_finetune() -> Pipeline:
    """A PEFT LoRA fine-tune of the tiny GPT-2 at kronfluence's defaults (true Fisher, damping 1e-8),
    tracking what kronfluence tracks by default: every Linear, the frozen `base_layer`s and `lm_head` too."""
    return Pipeline(
        name="lora-finetune",
        model=build_lora_gpt2,
        task=SummedLanguageModeling(LM_VOCAB),
        train_dataset=counting_tokens(64, seed=1),
        query_dataset=counting_tokens(4, seed=2),
        train=train_lora,
        factor_args=FactorArguments(strategy="ekfac"),
        score_args=ScoreArguments(),
        scores=("pairwise", "self"),
        batch_size=16,
        query_batch_size=4,
    )


def lora_modules(model: nn.Module) -> list[str]:
    """The names of the LoRA adapters' Linears (what a user tracks to analyse only what was trained)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and ".lora_" in name]


GPT2_SMALL_TOKENS = 32


def build_gpt2_small_shape() -> nn.Module:
    """GPT-2 small's real shape (`GPT2Config()`: vocab 50,257, n_embd 768, 12 layers, 1,024 positions,
    `lm_head` tied to `transformer.wte`), from the config with random weights, Conv1D replaced by Linear."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return linearise(GPT2LMHeadModel(GPT2Config())).eval()


def gpt2_small_shape() -> Pipeline:
    """Not trained; kronfluence's defaults. `lm_head`'s gradient covariance alone is 50,257² floats."""
    vocab = 50257
    return Pipeline(
        name="gpt2-small-shape",
        model=build_gpt2_small_shape,
        task=SummedLanguageModeling(vocab),
        train_dataset=counting_tokens(8, seed=1, vocab=vocab, length=GPT2_SMALL_TOKENS),
        query_dataset=counting_tokens(2, seed=2, vocab=vocab, length=GPT2_SMALL_TOKENS),
        train=None,
        factor_args=FactorArguments(strategy="ekfac"),
        score_args=ScoreArguments(),
        scores=("pairwise",),
        batch_size=4,
        query_batch_size=2,
    )


# ---------------------------------------------------------------------------------------------------------
# The sampling seed: a classifier at the true Fisher (kronfluence's default) and at the empirical Fisher


CLASSIFIER_FEATURES, CLASSIFIER_CLASSES, CLASSIFIER_EXAMPLES = 12, 3, 256


def teacher_classes(count: int, seed: int) -> TensorDataset:
    """Labels from a fixed random linear teacher's softmax (sampled, so the classes overlap)."""
    teacher = torch.randn(CLASSIFIER_FEATURES, CLASSIFIER_CLASSES, generator=torch.Generator().manual_seed(123))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, CLASSIFIER_FEATURES, generator=generator)
    labels = torch.multinomial(F.softmax(x @ teacher, dim=-1), 1, generator=generator).flatten()
    return TensorDataset(x, labels)


def build_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(CLASSIFIER_FEATURES, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, CLASSIFIER_CLASSES)
    )


def train_teacher_classifier(model: nn.Module, dataset: TensorDataset, monitor: TrainingMonitor) -> None:
    train_minibatches(model, dataset, monitor, F.cross_entropy, epochs=20, lr=1e-2, batch_size=64)


def fisher_classifier(empirical: bool, examples: int = CLASSIFIER_EXAMPLES) -> Pipeline:
    factor_args = FactorArguments(use_empirical_fisher=True) if empirical else FactorArguments()
    return Pipeline(
        name="empirical-fisher-classifier" if empirical else "true-fisher-classifier",
        model=build_classifier,
        task=ClassificationTask(),
        train_dataset=teacher_classes(examples, seed=1),
        query_dataset=teacher_classes(16, seed=2),
        train=train_teacher_classifier,
        factor_args=factor_args,
        score_args=ScoreArguments(),  # damping_factor=1e-08, kronfluence's default
        scores=("pairwise", "self"),
        batch_size=64,
        query_batch_size=16,
    )


def true_fisher_classifier() -> Pipeline:
    """256 examples at kronfluence's defaults: true Fisher (sampled targets), damping 1e-8."""
    return fisher_classifier(empirical=False)


def empirical_fisher_classifier() -> Pipeline:
    """The same with `FactorArguments(use_empirical_fisher=True)`: no sampling, nothing moves with the seed."""
    return fisher_classifier(empirical=True)
