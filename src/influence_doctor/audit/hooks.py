"""The hooks against autograd: what kronfluence's hooks compute, checked against the model's own gradients.

On a few examples of the probe (the `audit` lab) and an unwrapped copy of the trained model (float64 when
it fits), plain autograd gives each tracked module's per-example gradient of the Task's training loss and
of its measurement. Three comparisons follow, each per module:

- **gradients**: kronfluence's identity-strategy per-module scores (`g_q·g_t` and `‖g_t‖²` as its hooks
  see them, float64 accumulation) against the same inner products of the autograd gradients;
- **factors**: the normalised activation covariance from plain forward passes (masked tokens left out,
  the bias's column of ones appended, as kronfluence does) against kronfluence's, sum over count;
- **scores**: for a few (query, train) pairs, the score recomputed from kronfluence's own saved factors
  (eigenvectors, Λ, damping) with the autograd gradients against kronfluence's per-module score, as a
  share of the largest score those gradients could give through that preconditioner.

Beside them, what explains a disagreement: how many times each module runs per forward (a module called
three times is seen once by the hooks), the hooks against autograd of the module's last call alone, and a
weight tied to another module's (autograd of the module's own use against the parameter's whole
gradient: the share the hooks see).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from influence_doctor import changes
from influence_doctor.checks.hooks import HooksAudit
from influence_doctor.configuration import Configuration
from influence_doctor.labs import Lab, float64

AUDIT_EXAMPLES = 16
"""Training examples the hooks are audited on (one autograd backward each): a wrong hook is wrong on every
example, so a few show it; more would only cost time."""
AUDIT_QUERIES = 4
"""Queries the hooks are audited on (one autograd backward each)."""
SCORE_PAIRS = 4
"""Queries and training examples whose scores are recomputed from kronfluence's factors (4 × 4 pairs)."""
GRADIENT_BUDGET_BYTES = 1 << 29
"""Most bytes of autograd gradients one module may hold for the audit (examples × parameters × 8): a
larger module is left out and named, not audited on fewer examples."""
FLOAT64_BUDGET_BYTES = 1 << 31
"""The unwrapped copy is float64 when its parameters take at most this many bytes in float64; else it stays
in the model's own dtype (and the tolerance is that dtype's)."""


def audit_lab(run: Any) -> Lab | None:
    return Lab.at(run, "audit", AUDIT_EXAMPLES, AUDIT_QUERIES) if run.session.ready else None


def measure_hooks(run: Any, configuration: Configuration, factors_lab: Lab | None = None) -> HooksAudit:
    """The audit of `configuration`'s hooks (see the module); `factors_lab` is where kronfluence's activation
    covariance is compared (the probe), default the audit's own examples."""
    started = time.perf_counter()
    audit = HooksAudit()
    lab = audit_lab(run)
    why = _cannot_audit(run, configuration, lab)
    if why:
        audit.skipped = why
        return audit
    session = run.session
    model, _analyzer = session.prepared_for(configuration)
    task = session.task_for(configuration)
    copy_ = UnwrappedCopy.of(model, configuration)
    audit.dtype = copy_.model_dtype
    audit.examples, audit.queries = lab.examples, lab.queries
    audit.tied = {}
    audit.calls = copy_.count_calls(task, session.pipeline.collate, lab.scope.train[0])
    trains, queries = _examples(lab.scope.train), _examples(lab.scope.query)
    modules = copy_.auditable(len(trains) + len(queries), audit.left_out)
    collate = session.pipeline.collate
    train_gradients = copy_.gradients(task, collate, trains, modules, measurement=False)
    query_gradients = copy_.gradients(task, collate, queries, modules, measurement=True)
    kinds = ("pairwise",) if "pairwise" in session.kinds and queries else ("self",)
    identity = lab.trial(_identity(configuration), kinds, label="the hooks' own gradients (identity, per module)")
    pairwise = identity.artifacts.get("pairwise_scores") or {}
    self_scores = identity.artifacts.get("self_scores") or {}
    for module in modules:
        errors = []
        if module in pairwise and query_gradients:
            expected = query_gradients[module] @ train_gradients[module].T
            errors.append(relative_error(pairwise[module].double().cpu(), expected))
        if module in self_scores:
            expected = (train_gradients[module] ** 2).sum(dim=1)
            errors.append(relative_error(self_scores[module].double().cpu().flatten(), expected))
        if errors:
            audit.gradients[module] = max(errors)
    repeated = [m for m in modules if audit.calls.get(m, 1) > 1 and audit.gradients.get(m, 0.0) > 0]
    if repeated and pairwise:
        last = copy_.gradients(task, collate, trains, repeated, measurement=False, last_call_only=audit.calls)
        last_queries = copy_.gradients(task, collate, queries, repeated, measurement=True, last_call_only=audit.calls)
        for module in repeated:
            if module in pairwise and module in last and module in last_queries:
                expected = last_queries[module] @ last[module].T
                audit.last_call[module] = relative_error(pairwise[module].double().cpu(), expected)
    for module, (other, full) in copy_.tied_gradients(task, collate, trains, modules, train_gradients).items():
        audit.tied[module] = (other, full)
    audit.factors = _factors(run, configuration, copy_, factors_lab or lab, modules)
    audit.scores = _scores(run, configuration, factors_lab or lab, query_gradients, train_gradients, modules)
    audit.seconds = time.perf_counter() - started
    return audit


def audited(run: Any, configuration: Configuration, factors_lab: Lab | None = None) -> HooksAudit | None:
    """The audit of `configuration`, measured once per configuration (None without the model); an audit that
    raises is skipped with the reason, never fatal."""
    if not run.session.ready:
        return None
    key = configuration.key
    if key not in run.audits:
        try:
            run.audits[key] = measure_hooks(run, configuration, factors_lab)
        except Exception as exc:  # a measurement, never a crash: the user's model may not survive a deepcopy
            text = str(exc).strip().splitlines()
            run.audits[key] = HooksAudit(skipped=f"the audit raised {type(exc).__name__}: {text[0] if text else ''}")
    return run.audits[key]


def relative_error(measured: torch.Tensor, expected: torch.Tensor) -> float:
    """‖measured − expected‖ / ‖expected‖ (the absolute error where the expected value is zero)."""
    measured, expected = measured.to(torch.float64).reshape(expected.shape), expected.to(torch.float64)
    scale = float(torch.linalg.vector_norm(expected))
    error = float(torch.linalg.vector_norm(measured - expected))
    return error / scale if scale > 0 else error


def _cannot_audit(run: Any, configuration: Configuration, lab: Lab | None) -> str:
    if lab is None or not lab.examples:
        return "the model did not train, or there are no examples to audit on"
    task = run.session.pipeline.task
    if getattr(task, "enable_post_process_per_sample_gradient", False):
        return "the Task post-processes kronfluence's per-example gradients: autograd's are not comparable"
    return ""


def _identity(configuration: Configuration) -> Configuration:
    """`configuration` in float64, identity strategy, per-module scores, full-rank queries: what the hooks see."""
    reference = _per_module(configuration)
    return reference if reference.factor_args.strategy == "identity" else changes.apply("strategy:identity", reference)


def _per_module(configuration: Configuration) -> Configuration:
    """`configuration` in float64 with per-module, full-rank scores: kronfluence's factors and scores."""
    reference = changes.apply("set:score_args.compute_per_module_scores=True", float64(configuration))
    return changes.apply("low-rank:off", reference) if reference.score_args.query_gradient_low_rank else reference


def _examples(dataset: Any) -> list[Any]:
    return [dataset[index] for index in range(len(dataset))]


# --- the unwrapped copy -----------------------------------------------------------------------------------


@dataclass
class UnwrappedCopy:
    """The trained model without kronfluence's wrappers, its tracked modules by kronfluence's names."""

    model: nn.Module
    modules: dict[str, nn.Module]
    model_dtype: torch.dtype
    dtype: torch.dtype
    ties: dict[str, tuple[str, nn.Parameter]]  # module → (the other owner, the shared parameter)
    configuration: Configuration | None = None  # how the model runs (its checkpoints made non-reentrant)

    @classmethod
    def of(cls, prepared: nn.Module, configuration: Configuration | None = None) -> UnwrappedCopy:
        from kronfluence.module.tracked_module import TrackedModule

        model = copy.deepcopy(prepared)
        modules: dict[str, nn.Module] = {}
        for path, module in list(model.named_modules()):
            if isinstance(module, TrackedModule):
                modules[module.name] = module.original_module
                _replace(model, path, module.original_module)
        while hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile's wrapper
            model = model._orig_mod
        parameters = list(model.parameters())
        model_dtype = parameters[0].dtype if parameters else torch.float32
        bytes64 = sum(p.numel() for p in parameters) * 8
        dtype = torch.float64 if model_dtype.is_floating_point and bytes64 <= FLOAT64_BUDGET_BYTES else model_dtype
        model.to(dtype)
        ties = _untie(model, modules)
        for parameter in model.parameters():  # prepare_model switched every gradient off
            parameter.requires_grad_(False)
        for module in modules.values():
            for parameter in _own_parameters(module):
                parameter.requires_grad_(True)
        for _other, shared in ties.values():
            shared.requires_grad_(True)
        model.eval()
        return cls(model, modules, model_dtype, dtype, ties, configuration)

    def form(self) -> Any:
        """The model as the configuration runs it (`runner.executor.model_form`)."""
        from contextlib import nullcontext

        from influence_doctor.runner.executor import model_form

        return model_form(self.configuration) if self.configuration is not None else nullcontext()

    def auditable(self, examples: int, left_out: dict[str, str]) -> list[str]:
        chosen = []
        for name, module in self.modules.items():
            size = sum(p.numel() for p in module.parameters(recurse=False))
            if size * examples * 8 > GRADIENT_BUDGET_BYTES:
                left_out[name] = f"{size:,} parameters × {examples} examples exceed the audit's gradient budget"
            else:
                chosen.append(name)
        return chosen

    def batch(self, collate: Any, example: Any) -> Any:
        return _cast(collate([example]), self.dtype)

    def count_calls(self, task: Any, collate: Any, example: Any) -> dict[str, int]:
        """Forward calls of each tracked module in one example's training loss."""
        counts = dict.fromkeys(self.modules, 0)
        handles = [
            module.register_forward_hook(lambda *_args, name=name: counts.__setitem__(name, counts[name] + 1))
            for name, module in self.modules.items()
        ]
        try:
            with torch.no_grad(), self.form():
                task.compute_train_loss(self.batch(collate, example), self.model, False)
        finally:
            for handle in handles:
                handle.remove()
        return counts

    def gradients(
        self,
        task: Any,
        collate: Any,
        examples: list[Any],
        modules: list[str],
        measurement: bool,
        last_call_only: dict[str, int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """module → (examples × parameters) float64 autograd gradients of each example's loss (or measurement)."""
        if not examples or not modules:
            return {}
        parameters = {name: _own_parameters(self.modules[name]) for name in modules}
        rows: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        flat = [p for name in modules for p in parameters[name]]
        for example in examples:
            batch = self.batch(collate, example)
            with self.form(), _only_last_calls(self.modules, last_call_only or {}, modules):
                value = (
                    task.compute_measurement(batch, self.model)
                    if measurement
                    else task.compute_train_loss(batch, self.model, False)
                )
                grads = torch.autograd.grad(value, flat, allow_unused=True)
            index = 0
            for name in modules:
                parts = []
                for parameter in parameters[name]:
                    grad = grads[index]
                    index += 1
                    grad = torch.zeros_like(parameter) if grad is None else grad
                    parts.append(grad.reshape(grad.shape[0], -1))  # (outputs, inputs) and the bias's column
                rows[name].append(torch.cat(parts, dim=1).reshape(-1).to(torch.float64))
        return {name: torch.stack(values) for name, values in rows.items()}

    def tied_gradients(
        self, task: Any, collate: Any, examples: list[Any], modules: list[str], own: dict[str, torch.Tensor]
    ) -> dict[str, tuple[str, float]]:
        """For each tied module: (the other owner, the median share of the parameter's whole gradient that the
        module's own use carries, ⟨g_own, g_all⟩ / ‖g_all‖²)."""
        result: dict[str, tuple[str, float]] = {}
        for name, (other, shared) in self.ties.items():
            if name not in modules or name not in own:
                continue
            weight = self.modules[name].weight
            shares = []
            for row, example in zip(own[name], examples, strict=False):
                with self.form():
                    loss = task.compute_train_loss(self.batch(collate, example), self.model, False)
                    mine, theirs = torch.autograd.grad(loss, [weight, shared], allow_unused=True)
                mine = torch.zeros_like(weight) if mine is None else mine
                theirs = torch.zeros_like(shared) if theirs is None else theirs
                whole = (mine + theirs.reshape(mine.shape)).reshape(-1).double()
                norm = float(whole @ whole)
                if norm > 0:
                    shares.append(float(mine.reshape(-1).double() @ whole) / norm)
                del row
            if shares:
                result[name] = (other, float(statistics.median(shares)))
        return result


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def _untie(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, tuple[str, nn.Parameter]]:
    """Give each tracked module whose weight another module shares its own copy: autograd of the copy is the
    module's own use (what the hooks see), the other owner keeps the shared parameter."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for _name, parameter in module.named_parameters(recurse=False):
            owners.setdefault(id(parameter), []).append((path, module))
    ties: dict[str, tuple[str, nn.Parameter]] = {}
    for name, module in modules.items():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            continue
        others = [path for path, owner in owners.get(id(weight), []) if owner is not module]
        if others:
            ties[name] = (others[0], weight)
            module.weight = nn.Parameter(weight.detach().clone())
    return ties


def _own_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The weight then the bias: kronfluence's per-example gradient of a module is over exactly these."""
    return [p for p in (getattr(module, "weight", None), getattr(module, "bias", None)) if p is not None]


def _cast(batch: Any, dtype: torch.dtype) -> Any:
    """The batch with its floating tensors in `dtype` (the copy's), everything else as it was."""
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if type(batch) is dict:
        return {key: _cast(value, dtype) for key, value in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_cast(value, dtype) for value in batch)
    if hasattr(batch, "items") and hasattr(batch, "__setitem__"):  # a dict subclass (transformers' BatchEncoding)
        for key, value in list(batch.items()):
            batch[key] = _cast(value, dtype)
    return batch


@contextmanager
def _only_last_calls(modules: dict[str, nn.Module], calls: dict[str, int], names: list[str]) -> Iterator[None]:
    """Each named module called k > 1 times per example computes its first k − 1 calls with detached parameters:
    autograd then gives the gradient of its last call alone."""
    patched = []
    for name in names:
        count = calls.get(name, 1)
        if count <= 1:
            continue
        module = modules[name]
        state = {"call": 0}

        def forward(inputs: torch.Tensor, *args: Any, module=module, state=state, count=count, **kwargs: Any):
            index = state["call"] % count
            state["call"] += 1
            if index == count - 1:
                return type(module).forward(module, inputs, *args, **kwargs)
            weight = module.weight.detach()
            bias = module.bias.detach() if module.bias is not None else None
            if isinstance(module, nn.Conv2d):
                return module._conv_forward(inputs, weight, bias)
            return torch.nn.functional.linear(inputs, weight, bias)

        module.forward = forward
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


# --- factors and scores -------------------------------------------------------------------------------------


def _factors(
    run: Any, configuration: Configuration, copy_: UnwrappedCopy, lab: Lab, modules: list[str]
) -> dict[str, float]:
    """Normalised activation covariances of plain forward passes against kronfluence's (float64 settings)."""
    if configuration.factor_args.strategy not in ("kfac", "ekfac"):
        return {}
    trial = lab.trial(float64(configuration), label="float64 end to end, same damping")
    covariance = trial.artifacts.get("covariance")
    if not covariance:
        return {}
    linear = [
        m for m in modules if isinstance(copy_.modules[m], nn.Linear) and m in covariance["activation_covariance"]
    ]
    sums = {m: 0.0 for m in linear}
    counts = dict.fromkeys(linear, 0.0)
    session = run.session
    task = session.task_for(configuration)
    mask: dict[str, Any] = {"value": None}

    def hook(module: nn.Module, inputs: Any, _output: Any, name: str) -> None:
        activation = inputs[0].detach().to(torch.float64).reshape(-1, inputs[0].shape[-1])
        weights = mask["value"]
        if weights is not None and weights.numel() == activation.shape[0]:
            weights = weights.reshape(-1, 1).to(torch.float64)
            activation = activation * weights
        else:
            weights = None
        if module.bias is not None:
            ones = torch.ones(activation.shape[0], 1, dtype=torch.float64) if weights is None else weights
            activation = torch.cat([activation, ones], dim=1)
        sums[name] = sums[name] + activation.T @ activation
        counts[name] += float(weights.sum()) if weights is not None else activation.shape[0]

    handles = [copy_.modules[m].register_forward_hook(lambda mod, i, o, name=m: hook(mod, i, o, name)) for m in linear]
    data = lab.scope.train
    batch_size = configuration.batch_size
    try:
        with torch.no_grad(), copy_.form():
            for start in range(0, len(data), batch_size):
                examples = [data[index] for index in range(start, min(len(data), start + batch_size))]
                batch = (
                    copy_.batch(session.pipeline.collate, examples[0])
                    if len(examples) == 1
                    else _cast(session.pipeline.collate(examples), copy_.dtype)
                )
                mask["value"] = task.get_attention_mask(batch)
                task.compute_train_loss(batch, copy_.model, False)
    finally:
        for handle in handles:
            handle.remove()
    counted = covariance["num_activation_covariance_processed"]
    result = {}
    for module in linear:
        if not counts[module]:
            continue
        theirs = covariance["activation_covariance"][module].double() / max(float(counted[module]), 1.0)
        result[module] = relative_error(0.5 * (theirs + theirs.T), sums[module] / counts[module])
    return result


def _scores(
    run: Any,
    configuration: Configuration,
    factors_lab: Lab,
    query_gradients: dict[str, torch.Tensor],
    train_gradients: dict[str, torch.Tensor],
    modules: list[str],
) -> dict[str, float]:
    """A few pairs' scores recomputed from the factors of the float64 reference the probes already ran (its
    eigenvectors, Λ and damping) with autograd's gradients, summed over the modules, against that run's
    scores: {"all_modules": the largest error as a share of the largest score those gradients could give
    through the preconditioner, Σ_m ‖g_q,m‖·‖g_t,m‖·max 1/(Λ_m+λ)}. No kronfluence call of its own; the
    per-module localisation is the gradients' comparison."""
    strategy = configuration.factor_args.strategy
    if strategy not in ("ekfac", "kfac", "diagonal") or not query_gradients or "pairwise" not in run.session.kinds:
        return {}
    if set(modules) != set(train_gradients) or len(modules) < len(_tracked(run, configuration)):
        return {}  # a module left out: the sum over modules cannot be recomputed
    trial = factors_lab.measured(float64(configuration))
    if trial is None or "pairwise_scores" not in trial.artifacts:
        return {}
    theirs = trial.scores("pairwise")
    eigen = trial.artifacts.get("eigendecomposition") or {}
    lambdas = trial.artifacts.get("lambda") or {}
    damping = configuration.score_args.damping_factor
    pairs = min(SCORE_PAIRS, theirs.shape[0]), min(SCORE_PAIRS, theirs.shape[1])
    recomputed = torch.zeros(pairs, dtype=torch.float64)
    bound = torch.zeros(pairs, dtype=torch.float64)
    for module in modules:
        shape = _gradient_shape(run, module, query_gradients[module].shape[1], eigen, lambdas)
        inverse = _inverse_lambda(strategy, module, eigen, lambdas, damping, shape) if shape else None
        if inverse is None:
            return {}
        q = query_gradients[module][: pairs[0]].reshape(-1, *shape)
        t = train_gradients[module][: pairs[1]].reshape(-1, *shape)
        if strategy == "diagonal":
            preconditioned = q * inverse
        else:
            gradient_vectors = eigen["gradient_eigenvectors"][module].double()
            activation_vectors = eigen["activation_eigenvectors"][module].double()
            rotated = gradient_vectors.T @ q @ activation_vectors
            preconditioned = gradient_vectors @ (rotated * inverse) @ activation_vectors.T
        recomputed += torch.einsum("qoi,toi->qt", preconditioned, t)
        norms = torch.outer(q.reshape(q.shape[0], -1).norm(dim=1), t.reshape(t.shape[0], -1).norm(dim=1))
        bound += norms * float(inverse.abs().max())
    error = (theirs[: pairs[0], : pairs[1]] - recomputed).abs()
    largest = float(bound.max())
    return {"all_modules": float(error.max()) / largest if largest > 0 else 0.0}


def _tracked(run: Any, configuration: Configuration) -> list[str]:
    from kronfluence.module.tracked_module import TrackedModule

    model, _analyzer = run.session.prepared_for(configuration)
    return [m.name for m in model.modules() if isinstance(m, TrackedModule)]


def _gradient_shape(
    run: Any, module: str, size: int, eigen: dict[str, Any], lambdas: dict[str, Any]
) -> tuple[int, int] | None:
    """(outputs, inputs [+1 for the bias]) of the module's per-example gradient, from its factors."""
    if "lambda_matrix" in lambdas and module in lambdas["lambda_matrix"]:
        shape = tuple(lambdas["lambda_matrix"][module].shape[-2:])
    elif "gradient_eigenvectors" in eigen and module in eigen["gradient_eigenvectors"]:
        shape = (eigen["gradient_eigenvectors"][module].shape[0], eigen["activation_eigenvectors"][module].shape[0])
    else:
        return None
    return shape if shape[0] * shape[1] == size else None


def _inverse_lambda(
    strategy: str, module: str, eigen: dict[str, Any], lambdas: dict[str, Any], damping: Any, shape: tuple[int, int]
) -> torch.Tensor | None:
    """1/(Λ + λ) as kronfluence's preconditioner applies it (λ: the damping, or 0.1·mean Λ)."""
    if strategy in ("ekfac", "diagonal"):
        if module not in lambdas.get("lambda_matrix", {}):
            return None
        matrix = lambdas["lambda_matrix"][module].double() / float(lambdas["num_lambda_processed"][module])
    else:
        activation = eigen["activation_eigenvalues"][module].double()
        gradient = eigen["gradient_eigenvalues"][module].double()
        matrix = torch.outer(gradient, activation)
    from kronfluence.utils.constants import HEURISTIC_DAMPING_SCALE

    matrix = matrix.reshape(shape)
    value = HEURISTIC_DAMPING_SCALE * float(matrix.mean()) if damping is None else float(damping)
    return 1.0 / (matrix + value)
