"""Generated healthy cases on which the training and score heuristics are calibrated (SPEC 4.1).

A heuristic threshold is only as good as its false-alarm rate on runs that are known to be fine. The
cases here are real: tiny torch models really trained on synthetic data (loss curves) and small
pipelines really run through kronfluence under the doctor (score matrices), varied on purpose in
everything a user varies (model, data noise, batch size, optimizer, learning rate, run length, seed,
damping). None of the project's fixtures is among them, so no threshold can be tuned to one.

The rules that turn these cases into the library's limits live in the library, beside the limits
(`influence_doctor.checks.rules`); this package generates the cases, applies the rules and measures the
false-alarm rates (`python -m benchmarks.calibration` prints the tables, see `__main__.py`).
"""

from __future__ import annotations

import math
import random
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from kronfluence.task import Task
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from influence_doctor.causes import TRAINING_DIVERGED, TRAINING_OSCILLATING
from influence_doctor.checks.measures import robust_z_max
from influence_doctor.checks.rules import LIMIT_RULES, SCORE_LIMIT_RULES, LimitRule
from influence_doctor.checks.scores import check_module_dominance, check_query_scale, check_scores, total_scores
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.checks.train import SampleLoss, check_loss_curve
from influence_doctor.findings import Finding
from influence_doctor.pipeline import Pipeline, TrainingMonitor
from influence_doctor.runner.sample_loss import SAMPLE_GROUPS, measure_end, measure_start

BATCH_SIZES: tuple[int | None, ...] = (1, 2, 8, 32, None)
"""Minibatch sizes the curves cycle through; None is full batch."""
OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "adam")
TASKS: tuple[str, ...] = ("regression", "classification")
TRAINING_CHECKS: tuple[str, ...] = (
    "train.loss_finite",
    "train.loss_decreased",
    "train.divergence",
    "train.oscillation",
    "train.validation_gap",
    "train.trained_loss",
    "train.uphill",
    "train.explosion",
)
"""The training checks; validation_gap applies only to curves with validation losses, the last three only
to runs whose loss on a sample was measured before and after training (uphill: where the gradient was)."""
SAMPLE_EXAMPLES = 256
"""Training examples on which a run's loss is measured before and after training, as the doctor does."""


@dataclass(frozen=True)
class TrainingRecipe:
    """Everything that decides one healthy training run."""

    task: str
    optimizer: str
    learning_rate: float
    batch_size: int | None
    steps: int
    examples: int
    features: int
    hidden: tuple[int, ...]
    activation: str
    noise: float
    classes: int
    seed: int
    warm_steps: int = field(default=0, metadata={"help": "Steps trained before the recorded run (fine-tuning)."})

    @property
    def name(self) -> str:
        batch = "full" if self.batch_size is None else str(self.batch_size)
        layers = "x".join(map(str, self.hidden)) or "linear"
        warm = f" after {self.warm_steps} steps" if self.warm_steps else ""
        return (
            f"{self.task} {layers} {self.activation} {self.optimizer} lr={self.learning_rate:.2g} batch={batch} "
            f"steps={self.steps}{warm} noise={self.noise:.2g} seed={self.seed}"
        )


@dataclass(frozen=True)
class HealthyCurve:
    """The per-step training loss of one healthy run, with validation loss where it was measured."""

    name: str
    loss: list[float]
    validation_loss: list[float | None]
    sample: SampleLoss | None = None
    """The doctor's measurement on the first `SAMPLE_EXAMPLES` training examples before and after the
    recorded run (`runner.sample_loss`: the losses, a fresh copy's loss, the uphill cosine)."""


@dataclass(frozen=True)
class HealthyScores:
    """Per-module pairwise and self scores of one healthy pipeline, as kronfluence stored them."""

    name: str
    pairwise: dict[str, torch.Tensor]
    self_scores: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class AlarmRates:
    """How many healthy cases raised each check, per severity: every one of them is a false alarm.

    Rates are shares of the cases a check was applied to (module dominance needs per-module scores),
    each check counted at most once per case and severity.
    """

    cases: int = 0
    checked: Counter[str] = field(default_factory=Counter)
    fail: Counter[str] = field(default_factory=Counter)
    warn: Counter[str] = field(default_factory=Counter)
    any_fail: int = 0
    any_warn: int = 0

    def add(self, findings: Iterable[Finding], checked: Iterable[str]) -> None:
        """Count one case, to which the checks in `checked` were applied."""
        findings = list(findings)
        self.cases += 1
        self.checked.update(set(checked))
        fails = {finding.check for finding in findings if finding.severity == "fail"}
        warns = {finding.check for finding in findings if finding.severity == "warn"}
        self.fail.update(fails)
        self.warn.update(warns)
        self.any_fail += bool(fails)
        self.any_warn += bool(warns)

    def count(self, severity: str, check: str | None = None) -> int:
        """Cases with a finding of `severity` for `check` (for any check when None)."""
        if check is None:
            return self.any_fail if severity == "fail" else self.any_warn
        return (self.fail if severity == "fail" else self.warn)[check]

    def rate(self, severity: str, check: str | None = None) -> float:
        """Share of the cases `check` was applied to (of all cases when None) with such a finding."""
        total = self.cases if check is None else self.checked[check]
        return self.count(severity, check) / total if total else 0.0

    def rows(self) -> list[list[Any]]:
        """One row per check, then one for any check: cases, fails (count, %), warns (count, %)."""
        rows = []
        for check in [*sorted(self.checked), None]:
            cases = self.cases if check is None else self.checked[check]
            cells: list[Any] = [check or "any check", cases]
            for severity in ("fail", "warn"):
                cells += [self.count(severity, check), f"{100 * self.rate(severity, check):.1f}"]
            rows.append(cells)
        return rows


TABLE_HEADERS = ("check", "cases", "fail", "fail %", "warn", "warn %")


# --- healthy training curves ---------------------------------------------------------------------------


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def draw_recipe(index: int, rng: random.Random) -> TrainingRecipe:
    """One healthy recipe; the batch size, optimizer and task cycle so every combination is covered.

    Learning rates are the ranges a practitioner would pick for standardised inputs; plain SGD gets a
    smaller step on single examples, where the per-example curvature is highest. A quarter of the runs
    continue from a model already trained for 100-1,000 steps (fine-tuning a converged model, whose
    loss barely moves).
    """
    batch_size = BATCH_SIZES[index % len(BATCH_SIZES)]
    optimizer = OPTIMIZERS[(index // len(BATCH_SIZES)) % len(OPTIMIZERS)]
    task = TASKS[(index // (len(BATCH_SIZES) * len(OPTIMIZERS))) % len(TASKS)]
    if optimizer == "adam":
        learning_rate = _log_uniform(rng, 1e-3, 1e-2)
    else:
        learning_rate = _log_uniform(rng, 0.005, 0.05) if task == "regression" else _log_uniform(rng, 0.02, 0.3)
        learning_rate *= min(1.0, math.sqrt((batch_size or 32) / 8))  # single examples: steeper, noisier steps
        if optimizer == "momentum":
            learning_rate /= 10.0  # momentum 0.9 multiplies the effective step by 10
    depth = rng.choice((0, 1, 1, 2))
    warm_steps = round(_log_uniform(rng, 100, 1000)) if rng.random() < 0.25 else 0
    return TrainingRecipe(
        task=task,
        optimizer=optimizer,
        learning_rate=learning_rate,
        batch_size=batch_size,
        steps=round(_log_uniform(rng, 20, 300)),
        examples=rng.choice((64, 128, 256, 512)),
        features=rng.choice((4, 8, 16)),
        hidden=tuple(rng.choice((8, 16, 32, 64)) for _ in range(depth)),
        activation=rng.choice(("tanh", "relu")),
        noise=_log_uniform(rng, 0.01, 0.5) if task == "regression" else rng.uniform(0.0, 0.2),
        classes=rng.choice((2, 3, 5)),
        seed=rng.randrange(2**31),
        warm_steps=warm_steps,
    )


def _network(recipe: TrainingRecipe, outputs: int) -> nn.Module:
    activation = {"tanh": nn.Tanh, "relu": nn.ReLU}[recipe.activation]
    layers: list[nn.Module] = []
    width = recipe.features
    for hidden in recipe.hidden:
        layers += [nn.Linear(width, hidden), activation()]
        width = hidden
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


def synthetic_task(recipe: TrainingRecipe, generator: torch.Generator) -> tuple[TensorDataset, TensorDataset, int]:
    """Train and validation sets from a random teacher network, with target noise (regression) or
    flipped labels (classification); returns them and the number of model outputs."""
    count = recipe.examples + recipe.examples // 4
    x = torch.randn(count, recipe.features, generator=generator)
    teacher_in = torch.randn(recipe.features, 16, generator=generator) / math.sqrt(recipe.features)
    teacher_out = torch.randn(16, recipe.classes, generator=generator)
    signal = torch.tanh(x @ teacher_in) @ teacher_out / 2.0
    if recipe.task == "regression":
        y = signal[:, :1] + recipe.noise * torch.randn(count, 1, generator=generator)
        outputs = 1
    else:
        y = signal.argmax(dim=1)
        flipped = torch.rand(count, generator=generator) < recipe.noise
        y = torch.where(flipped, torch.randint(0, recipe.classes, (count,), generator=generator), y)
        outputs = recipe.classes
    split = recipe.examples
    return TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:]), outputs


def _optimizer(recipe: TrainingRecipe, parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=recipe.learning_rate)
    if recipe.optimizer == "ascent":  # a sick family's sign error: the loss is maximised
        return torch.optim.SGD(parameters, lr=recipe.learning_rate, maximize=True)
    return torch.optim.SGD(parameters, lr=recipe.learning_rate, momentum=0.9 if recipe.optimizer == "momentum" else 0)


def _train_steps(
    model: nn.Module, train: TensorDataset, recipe: TrainingRecipe, generator: torch.Generator
) -> Iterator[float]:
    """Train for the recipe's steps on reshuffled minibatches, yielding each step's minibatch loss once the
    update is applied (so a caller can measure validation loss between steps)."""
    optimizer = _optimizer(recipe, model.parameters())
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = (
        F.mse_loss if recipe.task == "regression" else F.cross_entropy
    )
    x, y = train.tensors
    batch_size = min(recipe.batch_size or len(x), len(x))
    order, cursor = torch.randperm(len(x), generator=generator), 0
    model.train()
    for _step in range(recipe.steps):
        if cursor + batch_size > len(x):
            order, cursor = torch.randperm(len(x), generator=generator), 0
        rows = order[cursor : cursor + batch_size]
        cursor += batch_size
        loss = loss_fn(model(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        yield float(loss.item())
    model.eval()


def train_recipe(recipe: TrainingRecipe) -> HealthyCurve:
    """Train the recipe's model for real; log every step's loss and, ten times a run, validation loss;
    measure the loss on a fixed sample of training examples before and after the recorded steps, as the
    doctor measures it."""
    generator = torch.Generator().manual_seed(recipe.seed)
    train, validation, outputs = synthetic_task(recipe, generator)
    torch.manual_seed(recipe.seed)
    model = _network(recipe, outputs)
    loss_fn = F.mse_loss if recipe.task == "regression" else F.cross_entropy
    if recipe.warm_steps:
        for _loss in _train_steps(model, train, replace(recipe, steps=recipe.warm_steps), generator):
            pass
    inputs, targets = (tensor[:SAMPLE_EXAMPLES] for tensor in train.tensors)

    def batch_losses(network: nn.Module) -> list[torch.Tensor]:
        """The sample in the doctor's groups (`SAMPLE_GROUPS`), so that its noise is measured alike."""
        size = max(1, len(inputs) // SAMPLE_GROUPS)
        return [loss_fn(network(x), y) for x, y in zip(inputs.split(size), targets.split(size), strict=True)]

    start = measure_start(model, batch_losses)
    every = max(1, recipe.steps // 10)
    losses: list[float] = []
    validation_losses: list[float | None] = []
    for step, loss in enumerate(_train_steps(model, train, recipe, generator)):
        losses.append(loss)
        if (step + 1) % every == 0 or step + 1 == recipe.steps:
            with torch.no_grad():
                validation_losses.append(float(loss_fn(model(validation.tensors[0]), validation.tensors[1]).item()))
        else:
            validation_losses.append(None)
    return HealthyCurve(recipe.name, losses, validation_losses, measure_end(start, model, batch_losses, len(inputs)))


def healthy_loss_curves(count: int = 120, seed: int = 0) -> list[HealthyCurve]:
    """`count` loss curves of real, healthy training runs (about 0.03 s each on one CPU core)."""
    rng = random.Random(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threading costs more than it saves
    try:
        return [train_recipe(draw_recipe(index, rng)) for index in range(count)]
    finally:
        torch.set_num_threads(threads)


def training_findings(curve: HealthyCurve, thresholds: Thresholds) -> tuple[list[Finding], dict[str, Any], list[str]]:
    """The training checks exactly as the doctor applies them to a run: findings, metrics, checks applied."""
    sample = curve.sample
    outcome = check_loss_curve(curve.loss, curve.validation_loss, thresholds, sample)
    checked = list(TRAINING_CHECKS)
    if not any(value is not None for value in curve.validation_loss):
        checked.remove("train.validation_gap")
    if sample is None:
        checked.remove("train.trained_loss")
        checked.remove("train.explosion")
    if sample is None or sample.uphill_cosine is None:
        checked.remove("train.uphill")
    return list(outcome.findings), dict(outcome.metrics), checked


def training_alarms(curves: Sequence[HealthyCurve], thresholds: Thresholds | None = None) -> AlarmRates:
    """False alarms of the training checks over healthy curves."""
    thresholds = thresholds or Thresholds()
    rates = AlarmRates()
    for curve in curves:
        findings, _metrics, checked = training_findings(curve, thresholds)
        rates.add(findings, checked)
    return rates


# --- limits derived from the healthy curves ------------------------------------------------------------


def derive_limits(curves: Sequence[HealthyCurve], rules: Sequence[LimitRule] = LIMIT_RULES) -> dict[str, float]:
    """Each rule's limit (`influence_doctor.checks.rules`) from the healthy curves' measured values."""
    defaults = Thresholds()
    metrics = [training_findings(curve, defaults)[1] for curve in curves]

    return {
        rule.threshold: rule.derive([float(m[rule.metric]) for m in metrics if m.get(rule.metric) is not None])
        for rule in rules
    }


# --- sick training curves ------------------------------------------------------------------------------

SICK_FAMILIES: dict[str, str] = {
    "explosion-plateau": TRAINING_DIVERGED.tag,
    "explosion-nan": TRAINING_DIVERGED.tag,
    "steady-rise": TRAINING_DIVERGED.tag,
    "oscillation": TRAINING_OSCILLATING.tag,
}
"""Families of broken training runs, each with the cause the training checks must give it (a `fail`)."""


def draw_sick_recipe(family: str, index: int, rng: random.Random) -> TrainingRecipe:
    """A healthy recipe's model and data, trained the way that breaks it:

    - explosion-plateau: Adam at a learning rate of 5–100 (a forgotten 1e-3 factor) on squared error:
      the loss jumps by orders of magnitude in the first steps, then settles on a plateau far above where
      it started;
    - explosion-nan: plain SGD at 100–10,000 on squared error: the weights overflow to inf/NaN;
    - steady-rise: gradient ascent (a sign error: `maximize=True`, or a loss negated by mistake) at
      0.01–0.1, for at least 50 steps;
    - oscillation: a learning-rate schedule that alternates every step between a contracting and an
      expanding step on an orthogonal design (`CyclicLR(step_size_up=1)`, a size meant in epochs).
    """
    base = replace(draw_recipe(index, rng), warm_steps=0)  # broken from the first step, as the family says
    if family == "explosion-plateau":
        return replace(base, task="regression", optimizer="adam", learning_rate=_log_uniform(rng, 5.0, 100.0))
    if family == "explosion-nan":
        return replace(base, task="regression", optimizer="sgd", learning_rate=_log_uniform(rng, 100.0, 1e4))
    if family == "steady-rise":
        return replace(base, optimizer="ascent", learning_rate=_log_uniform(rng, 0.01, 0.1), steps=max(base.steps, 50))
    if family == "oscillation":
        contraction = rng.uniform(0.05, 0.45)  # error × (1 − 2·lr) on the first step of each pair...
        return replace(
            base,
            task="regression",
            optimizer="alternating",
            learning_rate=contraction,
            hidden=(),
            features=rng.choice((4, 6, 8)),
            noise=_log_uniform(rng, 0.01, 0.1),
            batch_size=None,
            steps=max(base.steps, 40),
        )
    raise ValueError(f"unknown sick family {family!r}; known: {', '.join(SICK_FAMILIES)}")


def train_alternating(recipe: TrainingRecipe) -> HealthyCurve:
    """Full-batch SGD on a linear model over a ±1 full-factorial design (Hessian exactly 2·I): the step
    alternates between lr = a (error × (1 − 2a)) and the lr whose factor undoes it, so the loss swings
    between two levels with no net progress, as a per-step cyclic schedule makes it."""
    import itertools

    generator = torch.Generator().manual_seed(recipe.seed)
    x = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=recipe.features)))
    weights = torch.randn(recipe.features, generator=generator)
    y = (x @ weights + recipe.noise * torch.randn(len(x), generator=generator)).unsqueeze(1)
    torch.manual_seed(recipe.seed)
    model = nn.Linear(recipe.features, 1)
    contraction = 1.0 - 2.0 * recipe.learning_rate  # in (0.1, 0.9)
    expansion_lr = (1.0 + 1.0 / contraction) / 2.0  # error × −1/contraction: back to where it was
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.learning_rate)
    losses = []
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.learning_rate if step % 2 == 0 else expansion_lr
        loss = F.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.item()))
    return HealthyCurve(recipe.name, losses, [None] * len(losses))


def sick_loss_curves(family: str, count: int, seed: int) -> list[HealthyCurve]:
    """`count` loss curves of real training runs broken the way `family` says."""
    rng = random.Random(f"{family}-{seed}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipes = [draw_sick_recipe(family, index, rng) for index in range(count)]
        return [train_alternating(r) if r.optimizer == "alternating" else train_recipe(r) for r in recipes]
    finally:
        torch.set_num_threads(threads)


def recovered(curve: HealthyCurve) -> bool:
    """The run ended below where it started, by the loss measured on its training sample: an explosion
    that recovered is not an explosion that plateaus above its start (the family's defining trait)."""
    return curve.sample is not None and curve.sample.trained < curve.sample.untrained


@dataclass(frozen=True)
class FamilyOutcome:
    """What the training checks made of one sick family's runs."""

    runs: int
    members: int
    detected: int

    @property
    def rate(self) -> float:
        return self.detected / self.members if self.members else math.nan


def referenceless(curve: HealthyCurve) -> HealthyCurve:
    """The curve as the doctor measures a model beyond the evidence budget: the sample loss before and after
    alone, with no fresh copy's loss, no uphill cosine and no gradient noise."""
    if curve.sample is None:
        return curve
    bare = replace(
        curve.sample,
        reference=None,
        uphill_cosine=None,
        directional_t=None,
        gradient_snr=None,
        gradient_dimensions=None,
    )
    return replace(curve, sample=bare)


def family_outcome(curves: Sequence[HealthyCurve], family: str, thresholds: Thresholds | None = None) -> FamilyOutcome:
    """How many of a sick family's runs the training checks fail with the family's cause. For
    explosion-plateau, runs that `recovered` are set aside (counted in `runs`, not in `members`)."""
    thresholds = thresholds or Thresholds()
    cause = SICK_FAMILIES[family]
    members = [c for c in curves if not (family == "explosion-plateau" and recovered(c))]
    found = 0
    for curve in members:
        findings = training_findings(curve, thresholds)[0]
        found += any(f.severity == "fail" and f.cause == cause for f in findings)
    return FamilyOutcome(len(curves), len(members), found)


# --- healthy score matrices ----------------------------------------------------------------------------


class MarginClassificationTask(Task):
    """Summed cross-entropy, labels sampled from the softmax for the true Fisher, margin measured."""

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        inputs, labels = batch
        logits = model(inputs)
        if sample:
            with torch.no_grad():
                labels = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1).flatten()
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        inputs, labels = batch
        logits = model(inputs)
        correct = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
        others = logits.masked_fill(F.one_hot(labels, logits.shape[-1]).bool(), float("-inf"))
        return -(correct - others.logsumexp(dim=-1)).sum()


@dataclass(frozen=True)
class ScoreRecipe:
    """One healthy influence pipeline: a trained MLP, in-distribution queries, a damping choice."""

    task: str
    hidden: tuple[int, ...]
    activation: str
    features: int
    classes: int
    examples: int
    queries: int
    noise: float
    damping: float | None
    strategy: str
    per_module: bool
    epochs: int
    seed: int

    @property
    def name(self) -> str:
        damping = "heuristic" if self.damping is None else f"{self.damping:g}"
        layers = "x".join(map(str, self.hidden))
        return (
            f"{self.task} {layers} {self.activation} n={self.examples} q={self.queries} {self.strategy} "
            f"damping={damping}{' per-module' if self.per_module else ''} seed={self.seed}"
        )


def draw_score_recipe(index: int, rng: random.Random) -> ScoreRecipe:
    """One healthy pipeline; task, damping (kronfluence's default 1e-8 or its heuristic) and per-module
    scores cycle, the rest is drawn."""
    task = TASKS[index % len(TASKS)]
    return ScoreRecipe(
        task=task,
        hidden=tuple(rng.choice((8, 16, 32, 64)) for _ in range(rng.choice((1, 2)))),
        activation=rng.choice(("tanh", "relu")),
        features=rng.choice((4, 8, 16)),
        classes=rng.choice((2, 3, 5)),
        examples=rng.choice((128, 256, 512)),
        queries=rng.choice((8, 16, 32)),
        noise=_log_uniform(rng, 0.02, 0.3) if task == "regression" else rng.uniform(0.0, 0.1),
        damping=(1e-8, None)[(index // len(TASKS)) % 2],
        strategy=rng.choice(("ekfac", "ekfac", "kfac")),
        per_module=(index // (2 * len(TASKS))) % 2 == 1,
        epochs=rng.choice((10, 20, 40)),
        seed=rng.randrange(2**31),
    )


def score_pipeline(recipe: ScoreRecipe) -> Pipeline:
    """The recipe as a Pipeline: data from a random teacher, Adam on minibatches of 32."""
    from kronfluence.arguments import FactorArguments, ScoreArguments

    from influence_doctor.demos.uci_mlp import RegressionTask

    training_recipe = TrainingRecipe(
        task=recipe.task,
        optimizer="adam",
        learning_rate=3e-3,
        batch_size=32,
        steps=recipe.epochs * recipe.examples // 32,
        examples=recipe.examples,
        features=recipe.features,
        hidden=recipe.hidden,
        activation=recipe.activation,
        noise=recipe.noise,
        classes=recipe.classes,
        seed=recipe.seed,
    )
    train, held_out, outputs = synthetic_task(training_recipe, torch.Generator().manual_seed(recipe.seed))
    queries = TensorDataset(*(tensor[: recipe.queries] for tensor in held_out.tensors))

    def build() -> nn.Module:
        torch.manual_seed(recipe.seed)
        return _network(training_recipe, outputs)

    def fit(model: nn.Module, dataset: TensorDataset, monitor: TrainingMonitor) -> None:
        for loss in _train_steps(model, dataset, training_recipe, torch.Generator().manual_seed(recipe.seed)):
            monitor.log(loss)

    return Pipeline(
        name=f"healthy-{recipe.task}-{recipe.seed}",
        model=build,
        task=RegressionTask() if recipe.task == "regression" else MarginClassificationTask(),
        train_dataset=train,
        query_dataset=queries,
        train=fit,
        factor_args=FactorArguments(strategy=recipe.strategy),
        score_args=ScoreArguments(damping_factor=recipe.damping, compute_per_module_scores=recipe.per_module),
        batch_size=64,
        query_batch_size=recipe.queries,
    )


def run_score_recipe(recipe: ScoreRecipe) -> HealthyScores:
    """Run the recipe's pipeline under the doctor (no fixes, no probes) and keep the stored scores."""
    from influence_doctor.doctor import diagnose

    with tempfile.TemporaryDirectory() as out_dir:
        report = diagnose(
            score_pipeline(recipe),
            fix=False,
            out_dir=out_dir,
            examples=None,
            queries=None,
            progress=False,
            probe_examples=0,
            device="cpu",
        )
    artifacts = report.run.artifacts
    return HealthyScores(
        recipe.name,
        pairwise=dict(artifacts.get("pairwise_scores") or {}),
        self_scores=dict(artifacts.get("self_scores") or {}),
    )


def healthy_score_cases(count: int = 40, seed: int = 0) -> list[HealthyScores]:
    """Scores of `count` healthy pipelines really run through kronfluence (1-2 s each on CPU, most of it
    the doctor writing its report)."""
    rng = random.Random(seed)
    return [run_score_recipe(draw_score_recipe(index, rng)) for index in range(count)]


def score_findings(case: HealthyScores, thresholds: Thresholds) -> tuple[list[Finding], set[str]]:
    """The score checks exactly as the pairwise and self stages apply them: findings, and which checks ran."""
    findings: list[Finding] = []
    checked: set[str] = set()
    for stage, subject, per_module in (
        ("pairwise_scores", "pairwise", case.pairwise),
        ("self_scores", "self", case.self_scores),
    ):
        if not per_module:
            continue
        total = total_scores(per_module)
        findings += check_scores(stage, subject, total, thresholds).findings
        checked |= {"scores.finite", "scores.outliers"} | ({"scores.self_nonnegative"} if subject == "self" else set())
        if subject == "pairwise" and total.ndim == 2 and total.shape[0] >= 3:
            findings += check_query_scale(stage, total, thresholds).findings
            checked.add("scores.query_scale")
        if "all_modules" not in per_module and len(per_module) > 1:
            findings += check_module_dominance(stage, per_module, thresholds).findings
            checked.add("scores.module_dominance")
    return findings, checked


def score_metrics(case: HealthyScores) -> dict[str, float]:
    """The measured values the score heuristics hold to their limits, per case: the largest robust z of
    the pairwise and of the self scores, the query scale ratio and the dominant module's share."""
    metrics: dict[str, float] = {}
    for stage, subject, per_module in (
        ("pairwise_scores", "pairwise", case.pairwise),
        ("self_scores", "self", case.self_scores),
    ):
        if not per_module:
            continue
        total = total_scores(per_module)
        metrics[f"{subject}_max_robust_z"] = robust_z_max(total)
        if subject == "pairwise" and total.ndim == 2 and total.shape[0] >= 3:
            ratio = check_query_scale(stage, total, Thresholds()).metrics.get("query_scale_ratio")
            if ratio is not None:
                metrics["query_scale_ratio"] = float(ratio)
        if "all_modules" not in per_module and len(per_module) > 1:
            share = check_module_dominance(stage, per_module, Thresholds()).metrics.get("dominant_share")
            if share is not None:
                metrics["dominant_share"] = max(float(share), metrics.get("dominant_share", 0.0))
    return metrics


def derive_score_limits(
    cases: Sequence[HealthyScores], rules: Sequence[LimitRule] = SCORE_LIMIT_RULES
) -> dict[str, float]:
    """Each score rule's limit from the healthy pipelines' measured values."""
    metrics = [score_metrics(case) for case in cases]
    return {rule.threshold: rule.derive([m[rule.metric] for m in metrics if rule.metric in m]) for rule in rules}


SCORE_HEURISTICS: tuple[str, ...] = ("scores.outliers", "scores.query_scale", "scores.module_dominance")
"""The score checks that are heuristics. Non-finite and negative self-influence are measured wrong numbers:
where a generated pipeline has them it is sick (kronfluence's default damping of 1e-8 on a rank-deficient
K-FAC factor in float32 can make Λ+δ negative), and `measured_findings` lists them apart."""


def score_alarms(cases: Sequence[HealthyScores], thresholds: Thresholds | None = None) -> AlarmRates:
    """False alarms of the score heuristics over healthy pipelines."""
    thresholds = thresholds or Thresholds()
    rates = AlarmRates()
    for case in cases:
        findings, checked = score_findings(case, thresholds)
        rates.add([f for f in findings if f.check in SCORE_HEURISTICS], checked & set(SCORE_HEURISTICS))
    return rates


def measured_findings(
    cases: Sequence[HealthyScores], thresholds: Thresholds | None = None
) -> list[tuple[str, Finding]]:
    """(case, finding) for every measured wrong number among the generated pipelines: not false alarms,
    but pipelines the generator drew sick."""
    thresholds = thresholds or Thresholds()
    return [
        (case.name, finding)
        for case in cases
        for finding in score_findings(case, thresholds)[0]
        if finding.check not in SCORE_HEURISTICS and finding.severity == "fail"
    ]


def print_false_alarm_rates(curve_count: int = 600, score_count: int = 100, seed: int = 0) -> None:
    """Print the false-alarm tables of the training and score heuristics on freshly generated healthy cases."""
    from tabulate import tabulate

    for title, rates in (
        (f"{curve_count} healthy training curves", training_alarms(healthy_loss_curves(curve_count, seed))),
        (f"{score_count} healthy score cases", score_alarms(healthy_score_cases(score_count, seed))),
    ):
        print(f"False alarms on {title} (every finding is false):")
        print(tabulate(rates.rows(), headers=TABLE_HEADERS, tablefmt="simple"))
        print()
