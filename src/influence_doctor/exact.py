"""Exact influence for small models: the quantity kronfluence's EK-FAC approximates, computed directly.

kronfluence preconditions each tracked module m with its own block of the Fisher, built from
pseudo-gradients (gradients of `task.compute_train_loss(sample=True)`, one per training example), and
damps every block separately. This reference keeps exactly those semantics and drops only the
Kronecker-factored eigenbasis:

    score(q, i) = Σ_m g_q,mᵀ (F_m + δ_m I)⁻¹ g_i,m        F_m = (1/N) Σ u_m u_mᵀ over N example draws

u_m is the per-example pseudo-gradient of module m's weight and bias, g_q the gradient of
`task.compute_measurement`, g_i that of `task.compute_train_loss(sample=False)`, all in float64.
δ_m is the explicit damping factor, or, when it is None, 0.1 × the mean eigenvalue of F_m =
0.1·trace(F_m)/p_m: EK-FAC's Λ_m is F_m's diagonal in a rotated basis, so its mean is the same.
With one training example EK-FAC is exact and the two agree to float64 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

MAX_PARAMETERS = 20_000
"""Above this many tracked parameters the per-module solves stop being a quick probe."""
DEFAULT_SAMPLES = 4
"""Pseudo-gradient draws per training example when the Task's sampling is random."""
DEFAULT_SEED = 0
"""Seed of those draws, so the reference is reproducible and leaves the caller's RNG alone."""

SolveMethod = Literal["auto", "dense", "low_rank"]


@dataclass(frozen=True)
class TrackedBlock:
    """One tracked module: kronfluence's name for it and its original parameters (weight, then bias)."""

    name: str
    parameters: tuple[nn.Parameter, ...]

    @property
    def size(self) -> int:
        return sum(p.numel() for p in self.parameters)


def tracked_blocks(model: nn.Module) -> list[TrackedBlock]:
    """The blocks of kronfluence's block-diagonal curvature, in module order."""
    from kronfluence.module.tracked_module import TrackedModule

    return [
        TrackedBlock(m.name, tuple(m.original_module.parameters()))
        for m in model.modules()
        if isinstance(m, TrackedModule)
    ]


def tracked_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for block in tracked_blocks(model) for p in block.parameters]


def block_gradients(value: torch.Tensor, blocks: Sequence[TrackedBlock]) -> list[torch.Tensor]:
    """d value / d θ_m for every block, each flattened to a float64 CPU vector (zeros where unused)."""
    params = [p for block in blocks for p in block.parameters]
    grads = iter(torch.autograd.grad(value, params, allow_unused=True))
    result = []
    for block in blocks:
        pieces = []
        for p in block.parameters:
            g = next(grads)
            pieces.append((g if g is not None else torch.zeros_like(p)).reshape(-1).double().cpu())
        result.append(torch.cat(pieces))
    return result


@dataclass
class BlockFisher:
    """F = (1/count) Σ r rᵀ for one module. The rows r are kept while they are fewer than the module's
    size p (the low-rank case), then folded into a dense p×p sum, so memory stays within about min(rows, p)·p."""

    size: int
    count: int = 0
    rows: list[torch.Tensor] = field(default_factory=list)
    summed: torch.Tensor | None = None

    def add_example(self, draws: Sequence[torch.Tensor]) -> None:
        """One example's pseudo-gradient draws. Identical draws (a deterministic `sample=True`) merge into
        one row scaled by √multiplicity: the same F, at the rank of the distinct draws."""
        distinct: list[list[Any]] = []
        for draw in draws:
            for entry in distinct:
                if torch.equal(entry[0], draw):
                    entry[1] += 1
                    break
            else:
                distinct.append([draw, 1])
        for draw, multiplicity in distinct:
            self.rows.append(draw if multiplicity == 1 else draw * math.sqrt(multiplicity))
        self.count += len(draws)
        if len(self.rows) >= self.size:
            self._fold()

    def _fold(self) -> None:
        if not self.rows:
            return
        stacked = torch.stack(self.rows)
        self.summed = stacked.T @ stacked + (0.0 if self.summed is None else self.summed)
        self.rows = []

    @property
    def low_rank(self) -> bool:
        return self.summed is None

    def trace(self) -> float:
        total = sum(float(r @ r) for r in self.rows)
        if self.summed is not None:
            total += float(torch.trace(self.summed))
        return total / self.count

    def dense(self) -> torch.Tensor:
        summed = torch.zeros(self.size, self.size, dtype=torch.float64) if self.summed is None else self.summed
        if self.rows:
            stacked = torch.stack(self.rows)
            summed = summed + stacked.T @ stacked
        return summed / self.count

    def damped_products(
        self, left: torch.Tensor, right: torch.Tensor, damping: float, method: SolveMethod = "auto"
    ) -> torch.Tensor:
        """left (F + δI)⁻¹ rightᵀ for left [a × p] and right [b × p].

        Low rank (fewer rows than p): with F = Vᵀ diag(λ) V from the thin SVD of the rows, the inverse is
        Vᵀ diag(1/(λ+δ)) V on their span and 1/δ on its complement; the complement term is formed from the
        explicit residuals rather than as gᵀg − (Vg)ᵀ(Vg), which would cancel catastrophically when δ ≪ λ.
        """
        if method == "auto":
            method = "low_rank" if self.low_rank else "dense"
        if method == "dense":
            curvature = self.dense() + damping * torch.eye(self.size, dtype=torch.float64)
            return left @ torch.linalg.solve(curvature, right.T)
        if not self.low_rank:
            raise ValueError("the Fisher was folded into a dense matrix; only the dense solve is possible")
        if not damping > 0:
            raise ValueError(f"damping {damping} leaves F + δI singular: its rank is below {self.size}")
        if not self.rows:
            return left @ right.T / damping
        _, singular, basis = torch.linalg.svd(torch.stack(self.rows) / math.sqrt(self.count), full_matrices=False)
        left_span, right_span = left @ basis.T, right @ basis.T
        span = (left_span / (singular.square() + damping)) @ right_span.T
        left_rest, right_rest = left - left_span @ basis, right - right_span @ basis
        return span + (left_rest @ right_rest.T) / damping


def block_dampings(fishers: dict[str, BlockFisher], damping_factor: float | None) -> dict[str, float]:
    """kronfluence's damping per module: the explicit factor, or 0.1 × the mean eigenvalue of F_m."""
    if damping_factor is not None:
        return {name: float(damping_factor) for name in fishers}
    return {name: 0.1 * fisher.trace() / fisher.size for name, fisher in fishers.items()}


def _rng_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def fisher_blocks(
    model: nn.Module,
    task: Any,
    blocks: Sequence[TrackedBlock],
    train_batches: Sequence[Any],
    samples: int = DEFAULT_SAMPLES,
    seed: int = DEFAULT_SEED,
    empirical: bool = False,
) -> dict[str, BlockFisher]:
    """Per-module Fisher from `samples` pseudo-gradient draws of every single-example batch.

    kronfluence takes one draw per example and pass; one draw here too would make the reference a noisy
    estimate of E[g gᵀ] whose Monte-Carlo error fidelity would then blame on EK-FAC, so a few draws are
    averaged. A deterministic `sample=True` gives identical draws, which merge (see BlockFisher.add_example).
    The draws are seeded inside a forked RNG: reproducible, and the caller's random state is untouched.
    `empirical` follows kronfluence's `use_empirical_fisher`: the true targets' gradients (one draw).
    """
    if samples < 1:
        raise ValueError(f"samples must be at least 1, not {samples}")
    fishers = {block.name: BlockFisher(block.size) for block in blocks}
    with torch.random.fork_rng(devices=_rng_devices()):
        torch.manual_seed(seed)
        for batch in train_batches:
            draws = [
                block_gradients(task.compute_train_loss(batch, model, sample=not empirical), blocks)
                for _ in range(1 if empirical else samples)
            ]
            for index, block in enumerate(blocks):
                fishers[block.name].add_example([draw[index] for draw in draws])
    return fishers


def exact_pairwise(
    model: nn.Module,
    task: Any,
    train_batches: Sequence[Any],
    query_batches: Sequence[Any],
    damping: float | None,
    *,
    train_columns: int | None = None,
    samples: int = DEFAULT_SAMPLES,
    seed: int = DEFAULT_SEED,
    method: SolveMethod = "auto",
    empirical: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Exact pairwise influence [queries × train columns] in float64 and the damping used per module.

    The Fisher comes from all `train_batches` (what kronfluence's factors saw); scores are computed for the
    first `train_columns` of them (all when None). Each batch is a single example.
    """
    from kronfluence.module.tracked_module import ModuleMode
    from kronfluence.module.utils import set_mode

    if not train_batches:
        raise ValueError("no training examples to build the Fisher from")
    blocks = tracked_blocks(model)
    params = [p for block in blocks for p in block.parameters]
    flags = [p.requires_grad for p in params]
    set_mode(model, ModuleMode.DEFAULT)  # no kronfluence hooks may record our passes
    try:
        for p in params:
            p.requires_grad_(True)
        fishers = fisher_blocks(model, task, blocks, train_batches, samples, seed, empirical)
        dampings = block_dampings(fishers, damping)
        scored = train_batches if train_columns is None else train_batches[:train_columns]
        train = [block_gradients(task.compute_train_loss(b, model, sample=False), blocks) for b in scored]
        queries = [block_gradients(task.compute_measurement(b, model), blocks) for b in query_batches]
        scores = torch.zeros(len(queries), len(train), dtype=torch.float64)
        for index, block in enumerate(blocks):
            left = torch.stack([q[index] for q in queries])
            right = torch.stack([t[index] for t in train])
            scores += fishers[block.name].damped_products(left, right, dampings[block.name], method)
        return scores, dampings
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def single_example_batches(dataset: Any, count: int | None = None, collate: Any = None) -> list[Any]:
    """Each example as a batch of one, the way the user's DataLoader would collate it."""
    from torch.utils.data import default_collate

    collate = collate or default_collate
    indices = range(len(dataset) if count is None else min(count, len(dataset)))
    return [collate([dataset[i]]) for i in indices]


def exact_fidelity(run: Any, train_columns: int = 256, samples: int = DEFAULT_SAMPLES) -> dict[str, Any]:
    """Spearman and Pearson of the final kronfluence pairwise scores against exact influence."""
    from accelerate.utils import send_to_device

    from influence_doctor.checks.precision import rank_agreement
    from influence_doctor.checks.scores import total_scores
    from influence_doctor.fidelity import pearson

    if run.model is None:
        return {"skipped": "no model"}
    count = sum(p.numel() for p in tracked_parameters(run.model))
    if count > MAX_PARAMETERS:
        return {"skipped": f"{count} tracked parameters, above the {MAX_PARAMETERS} an exact solve allows"}
    pairwise = run.artifacts.get("pairwise_scores")
    if not pairwise or not run.stages["pairwise_scores"].completed:
        return {"skipped": "no pairwise scores to compare"}
    device = next(run.model.parameters()).device
    approx = total_scores(pairwise).double().cpu()
    columns = min(train_columns, approx.shape[1])
    collate = run.pipeline.collate
    train_batches = [send_to_device(b, device) for b in single_example_batches(run.train_subset, collate=collate)]
    query_batches = [send_to_device(b, device) for b in single_example_batches(run.query_subset, collate=collate)]
    try:
        exact, dampings = exact_pairwise(
            run.model,
            getattr(run, "task", None) or run.pipeline.task,
            train_batches,
            query_batches,
            run.score_args.damping_factor,
            train_columns=columns,
            samples=samples,
            empirical=bool(getattr(run.factor_args, "use_empirical_fisher", False)),
        )
    except Exception as exc:  # an unusual Task or a singular curvature: report, do not fail
        return {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    approx = approx[:, :columns]
    spearman, linear = rank_agreement(approx, exact), pearson(approx, exact)
    run.exact_pairwise = (approx, exact.detach().double().cpu())
    return {
        "parameters": count,
        "damping": dampings,
        "train_examples_compared": columns,
        "spearman": spearman,
        "pearson": linear,
        "finite": bool(torch.isfinite(exact).all()) and not math.isnan(spearman),
    }
