"""Exact influence for small models: g_qᵀ (G/n + δI)⁻¹ g_i with the Gauss-Newton matrix G formed
directly in float64, the reference that EK-FAC approximates.

G = Σ_i J_iᵀ H_i J_i, where J_i is the Jacobian of example i's model outputs with respect to the tracked
parameters and H_i the Hessian of the task's training loss with respect to those outputs. The loss is
read from the user's own Task by handing it a stand-in model that returns fixed outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

MAX_PARAMETERS = 20_000
"""Above this many tracked parameters G (p×p float64) and its solve get too large to be a quick probe."""
MAX_OUTPUTS = 64
"""Per-example output size above which one Jacobian row per output is too slow."""


def tracked_parameters(model: nn.Module) -> list[nn.Parameter]:
    from kronfluence.module.tracked_module import TrackedModule

    return [p for m in model.modules() if isinstance(m, TrackedModule) for p in m.original_module.parameters()]


class _FixedOutputs(nn.Module):
    """Stands in for the model inside Task.compute_train_loss so the loss becomes a function of z."""

    def __init__(self, outputs: torch.Tensor) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.outputs


def flat_grad(value: torch.Tensor, params: Sequence[torch.Tensor], retain: bool = False) -> torch.Tensor:
    grads = torch.autograd.grad(value, params, retain_graph=retain, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)]
    )


def gauss_newton(
    model: nn.Module,
    loss_of_outputs: Callable[[Any, torch.Tensor], torch.Tensor],
    batches: Sequence[Any],
    forward: Callable[[Any], torch.Tensor],
    params: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Σ_i J_iᵀ H_i J_i in float64 over single-example batches."""
    size = sum(p.numel() for p in params)
    total = torch.zeros(size, size, dtype=torch.float64)
    for batch in batches:
        outputs = forward(batch)
        flat = outputs.reshape(-1)
        if flat.numel() > MAX_OUTPUTS:
            raise ValueError(f"an example has {flat.numel()} outputs, more than {MAX_OUTPUTS}")
        jacobian = torch.stack([flat_grad(flat[k], params, retain=True) for k in range(flat.numel())]).double().cpu()
        z = outputs.detach().clone()
        hessian = (
            torch.autograd.functional.hessian(lambda v, b=batch: loss_of_outputs(b, v), z)
            .reshape(flat.numel(), flat.numel())
            .double()
            .cpu()
        )
        total += jacobian.T @ hessian @ jacobian
    return total


def exact_pairwise(
    model: nn.Module,
    task: Any,
    train_batches: Sequence[Any],
    query_batches: Sequence[Any],
    damping: float | None,
    forward: Callable[[Any], torch.Tensor],
) -> tuple[torch.Tensor, float]:
    """Exact pairwise influence [queries × train] and the damping used (kronfluence's heuristic when
    None: 0.1 × the mean eigenvalue of G/n, i.e. 0.1·trace/p)."""
    from kronfluence.module.tracked_module import ModuleMode
    from kronfluence.module.utils import set_mode

    params = tracked_parameters(model)
    flags = [p.requires_grad for p in params]
    set_mode(model, ModuleMode.DEFAULT)
    try:
        for p in params:
            p.requires_grad_(True)

        def loss_of_outputs(batch: Any, outputs: torch.Tensor) -> torch.Tensor:
            return task.compute_train_loss(batch, _FixedOutputs(outputs), sample=False)

        g = gauss_newton(model, loss_of_outputs, train_batches, forward, params) / max(len(train_batches), 1)
        delta = 0.1 * float(torch.trace(g)) / g.shape[0] if damping is None else float(damping)
        curvature = g + delta * torch.eye(g.shape[0], dtype=torch.float64)
        train = torch.stack([flat_grad(task.compute_train_loss(b, model, sample=False), params) for b in train_batches])
        queries = torch.stack([flat_grad(task.compute_measurement(b, model), params) for b in query_batches])
        solved = torch.linalg.solve(curvature, train.double().cpu().T)  # p × n
        return queries.double().cpu() @ solved, delta
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def single_example_batches(dataset: Any, count: int | None = None) -> list[Any]:
    """Each example as a batch of one, the way a DataLoader would collate it."""
    from torch.utils.data import default_collate

    indices = range(len(dataset) if count is None else min(count, len(dataset)))
    return [default_collate([dataset[i]]) for i in indices]


def exact_fidelity(run: Any, train_columns: int = 256) -> dict[str, Any]:
    """Spearman and Pearson of the final kronfluence pairwise scores against exact influence."""
    from influence_doctor.checks.precision import rank_agreement
    from influence_doctor.fidelity import pearson
    from influence_doctor.report.scores import total_scores

    if run.model is None:
        return {"skipped": "no model"}
    params = tracked_parameters(run.model)
    count = sum(p.numel() for p in params)
    if count > MAX_PARAMETERS:
        return {"skipped": f"{count} tracked parameters, above the {MAX_PARAMETERS} an exact solve allows"}
    pairwise = run.artifacts.get("pairwise_scores")
    if not pairwise or not run.stages["pairwise_scores"].completed:
        return {"skipped": "no pairwise scores to compare"}
    device = next(run.model.parameters()).device

    def forward(batch: Any) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        class Recorder(nn.Module):
            def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
                out = run.model(*args, **kwargs)
                captured.append(out)
                return out

        run.pipeline.task.compute_train_loss(batch, Recorder(), sample=False)
        return captured[0]

    to_device = lambda batch: [t.to(device) if hasattr(t, "to") else t for t in batch]  # noqa: E731
    train_batches = [to_device(b) for b in single_example_batches(run.train_subset)]
    query_batches = [to_device(b) for b in single_example_batches(run.query_subset)]
    try:
        exact, delta = exact_pairwise(
            run.model, run.pipeline.task, train_batches, query_batches, run.score_args.damping_factor, forward
        )
    except Exception as exc:  # an unusual Task (several model calls, huge outputs): report, do not fail
        return {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    approx = total_scores(pairwise).double().cpu()
    columns = min(train_columns, approx.shape[1])
    exact, approx = exact[:, :columns].cpu(), approx[:, :columns]
    spearman, linear = rank_agreement(approx, exact), pearson(approx, exact)
    return {
        "parameters": count,
        "damping": delta,
        "train_examples_compared": columns,
        "spearman": spearman,
        "pearson": linear,
        "finite": bool(torch.isfinite(exact).all()) and not math.isnan(spearman),
    }
