"""The pure pieces of the hooks audit (`audit/hooks.py`) and its judgement (`checks/hooks.py`,
`checks/verdicts.explain_recounted_covariance`), each against a float64 reference computed by hand here:
`torch.func` per-example gradients, formulas written out, a model rebuilt with detached or separate
parameters. Tiny models, no `diagnose`: every test runs in well under a second.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from kronfluence.analyzer import prepare_model
from kronfluence.module.tracked_module import TrackedModule
from kronfluence.task import Task
from torch import nn
from torch.nn import functional as F
from torch.utils.data import default_collate

from influence_doctor.audit.hooks import HooksAudit, UnwrappedCopy, _only_last_calls, _untie, relative_error
from influence_doctor.checks.hooks import check_hooks, failing_modules, hooks_tolerance
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.checks.verdicts import explain_recounted_covariance
from influence_doctor.findings import info, warn

FLOAT32_TOLERANCE = math.sqrt(torch.finfo(torch.float32).eps)  # 3.45e-4: hooks_error_sqrt_eps = 1 by default
FLOAT64_TOLERANCE = math.sqrt(torch.finfo(torch.float64).eps)  # 1.49e-8


# ---------------------------------------------------------------------------------------------------------
# Tiny models and tasks


class SquaredError(Task):
    """Summed squared error; the measurement is a different function (the outputs' sum) so that a mix-up of
    loss and measurement shows."""

    def compute_train_loss(self, batch, model, sample=False):
        inputs, targets = batch
        return ((model(inputs) - targets) ** 2).sum()

    def compute_measurement(self, batch, model):
        inputs, _targets = batch
        return model(inputs).sum()


class TokenCrossEntropy(Task):
    def compute_train_loss(self, batch, model, sample=False):
        ids, targets = batch
        logits = model(ids)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def regression_examples(count: int, inputs: int = 3, outputs: int = 2, seed: int = 1) -> list[tuple]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, inputs, generator=generator)
    y = torch.randn(count, outputs, generator=generator)
    return [(x[i], y[i]) for i in range(count)]


class Repeated(nn.Module):
    """`inp` once, one `cell` Linear three times, `head` once (the shared-cell construct, small)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(3, 4)
        self.cell = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for _ in range(3):
            h = torch.tanh(self.cell(h))
        return self.head(h)


class TiedLM(nn.Module):
    """An embedding whose weight the (tracked) output head shares, as GPT-2's `lm_head` and `wte`."""

    def __init__(self, vocab: int = 5, width: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def unwrapped(model: nn.Module, task: Task) -> tuple[nn.Module, UnwrappedCopy]:
    prepared = prepare_model(model, task)
    return prepared, UnwrappedCopy.of(prepared)


def per_example_reference(model: nn.Module, task: Task, examples: list[tuple], measurement: bool = False):
    """name → (examples × parameters) float64 gradients by torch.func over a float64 copy of the plain model,
    each Linear's in kronfluence's layout: (outputs, inputs) then the bias as a last column."""
    reference = model.double()
    params = {k: v.detach() for k, v in reference.named_parameters()}

    def value(p, x, y):
        batch = (x[None], y[None])

        def forward(inputs):
            return torch.func.functional_call(reference, p, (inputs,))

        return task.compute_measurement(batch, forward) if measurement else task.compute_train_loss(batch, forward)

    x = torch.stack([e[0] for e in examples]).double()
    y = torch.stack([e[1] for e in examples]).double()
    grads = torch.func.vmap(torch.func.grad(value), in_dims=(None, 0, 0))(params, x, y)
    result = {}
    for name, module in reference.named_modules():
        if isinstance(module, nn.Linear):
            weight = grads[f"{name}.weight"]
            bias = grads[f"{name}.bias"][..., None]
            result[name] = torch.cat([weight, bias], dim=-1).reshape(len(examples), -1)
    return result


# ---------------------------------------------------------------------------------------------------------
# relative_error


def test_relative_error_is_the_norm_of_the_difference_over_the_norm_of_the_expected():
    measured = torch.tensor([1.0, 2.0, 2.0])
    expected = torch.tensor([1.0, 2.0, 3.0])
    assert relative_error(measured, expected) == pytest.approx(1.0 / math.sqrt(14.0), rel=1e-15)
    # the measured tensor is reshaped to the expected's shape, and the order of arguments matters
    assert relative_error(measured.reshape(3, 1), expected) == pytest.approx(1.0 / math.sqrt(14.0), rel=1e-15)
    assert relative_error(expected, measured) == pytest.approx(1.0 / 3.0, rel=1e-15)


def test_relative_error_is_absolute_where_the_expected_is_zero_and_computed_in_float64():
    assert relative_error(torch.tensor([3.0, 4.0]), torch.zeros(2)) == pytest.approx(5.0, rel=1e-15)
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    # a float64 difference of 1e-12 must survive (a float32 computation would round it to zero)
    one = torch.tensor([1.0], dtype=torch.float64)
    assert relative_error(one, one + 1e-12) == pytest.approx(1e-12, rel=1e-3)
    # a float32 measured against a float64 expected: the float32 rounding of 0.1 is what is measured
    tenth = torch.tensor([0.1], dtype=torch.float64)
    rounded = abs(float(torch.tensor(0.1, dtype=torch.float32).double()) - 0.1) / 0.1
    assert relative_error(tenth.float(), tenth) == pytest.approx(rounded, rel=1e-9)
    assert rounded > 1e-9


# ---------------------------------------------------------------------------------------------------------
# UnwrappedCopy.of


def test_unwrapped_copy_gives_plain_modules_by_kronfluences_names_with_gradients_on():
    task = SquaredError()
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Sequential(nn.Linear(4, 2)))
    prepared = prepare_model(model, task)
    before = {name: (p.requires_grad, p.dtype) for name, p in prepared.named_parameters()}
    copy_ = UnwrappedCopy.of(prepared)
    tracked = {m.name: m for m in prepared.modules() if isinstance(m, TrackedModule)}
    assert set(tracked) == {"0", "3.0"}

    assert set(copy_.modules) == set(tracked)
    for name, module in copy_.modules.items():
        assert type(module) is nn.Linear  # the original module, not kronfluence's wrapper
        assert copy_.model.get_submodule(name) is module  # in place in the copy, under kronfluence's name
        assert module.weight.requires_grad and module.bias.requires_grad
        assert module.weight.dtype == torch.float64
        expected = tracked[name].original_module.weight.detach().double()
        assert torch.equal(module.weight.detach(), expected)
    assert not any(isinstance(m, TrackedModule) for m in copy_.model.modules())
    # what is not tracked stays frozen; the model is float64, in eval mode; its own dtype is remembered
    assert not any(p.requires_grad for p in copy_.model.get_submodule("1").parameters())
    assert copy_.model_dtype == torch.float32 and copy_.dtype == torch.float64
    assert not copy_.model.training
    assert copy_.ties == {}
    # the prepared model itself is left as kronfluence made it
    assert isinstance(prepared.get_submodule("0"), TrackedModule)
    assert {name: (p.requires_grad, p.dtype) for name, p in prepared.named_parameters()} == before
    assert not prepared.get_submodule("0").original_module.weight.requires_grad


def test_unwrapped_copy_computes_the_prepared_models_function():
    task = SquaredError()
    prepared, copy_ = unwrapped(mlp(), task)
    x = torch.randn(5, 3)
    with torch.no_grad():
        assert torch.allclose(copy_.model(x.double()), prepared(x).double(), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# UnwrappedCopy.gradients


def test_per_example_gradients_equal_torch_func_in_kronfluences_layout():
    task = SquaredError()
    examples = regression_examples(5)
    _prepared, copy_ = unwrapped(mlp(), task)
    measured = copy_.gradients(task, default_collate, examples, ["0", "2"], measurement=False)
    expected = per_example_reference(mlp(), task, examples)
    assert set(measured) == {"0", "2"}
    for name in ("0", "2"):
        assert measured[name].dtype == torch.float64
        assert measured[name].shape == (5, expected[name].shape[1])
        assert relative_error(measured[name], expected[name]) < 1e-12


def test_per_example_gradients_of_the_measurement_are_the_measurements():
    task = SquaredError()
    examples = regression_examples(4)
    _prepared, copy_ = unwrapped(mlp(), task)
    measured = copy_.gradients(task, default_collate, examples, ["2"], measurement=True)
    expected = per_example_reference(mlp(), task, examples, measurement=True)["2"]
    assert relative_error(measured["2"], expected) < 1e-12
    loss = per_example_reference(mlp(), task, examples, measurement=False)["2"]
    assert relative_error(measured["2"], loss) > 0.1  # the negative control: the loss's gradient differs


def test_the_last_layers_gradient_is_delta_times_activation_then_the_bias_column_as_kronfluence_computes_it():
    """By hand for the head: δ = 2(ŷ − y), a = tanh(W₁x + b₁); the gradient is δ ⊗ [a, 1], (outputs, inputs + 1).
    kronfluence's own `compute_per_sample_gradient` on the same a and δ gives the same matrix."""
    task = SquaredError()
    examples = regression_examples(3)
    prepared, copy_ = unwrapped(mlp(), task)
    measured = copy_.gradients(task, default_collate, examples, ["2"], measurement=False)["2"]
    reference = mlp().double()
    w1, b1 = reference[0].weight.detach(), reference[0].bias.detach()
    w2, b2 = reference[2].weight.detach(), reference[2].bias.detach()
    x = torch.stack([e[0] for e in examples]).double()
    y = torch.stack([e[1] for e in examples]).double()
    a = torch.tanh(x @ w1.T + b1)
    delta = 2.0 * (a @ w2.T + b2 - y)
    by_hand = torch.stack([torch.outer(delta[i], torch.cat([a[i], torch.ones(1, dtype=a.dtype)])) for i in range(3)])
    assert measured.shape == (3, 2 * 5)
    assert relative_error(measured, by_hand.reshape(3, -1)) < 1e-12
    head = prepared.get_submodule("2")
    theirs = head.compute_per_sample_gradient(input_activation=a, output_gradient=delta)
    assert theirs.shape == (3, 2, 5)
    assert relative_error(measured, theirs.reshape(3, -1)) < 1e-12


def test_gradients_of_no_examples_or_no_modules_are_empty():
    task = SquaredError()
    _prepared, copy_ = unwrapped(mlp(), task)
    assert copy_.gradients(task, default_collate, [], ["0"], measurement=False) == {}
    assert copy_.gradients(task, default_collate, regression_examples(2), [], measurement=False) == {}


# ---------------------------------------------------------------------------------------------------------
# count_calls and _only_last_calls


def test_count_calls_counts_a_module_applied_three_times():
    task = SquaredError()
    _prepared, copy_ = unwrapped(Repeated(), task)
    example = regression_examples(1, inputs=3, outputs=2)[0]
    assert copy_.count_calls(task, default_collate, example) == {"inp": 1, "cell": 3, "head": 1}
    # the hooks are removed afterwards: a second count is the same, not doubled
    assert copy_.count_calls(task, default_collate, example) == {"inp": 1, "cell": 3, "head": 1}
    assert all(not module._forward_hooks for module in copy_.modules.values())


def last_call_reference(examples: list[tuple]) -> torch.Tensor:
    """The gradient of `cell`'s last call alone, by hand: a float64 Repeated whose first two calls use detached
    weights."""
    model = Repeated().double()
    weight, bias = model.cell.weight, model.cell.bias
    rows = []
    for x, y in examples:
        x, y = x.double()[None], y.double()[None]
        h = torch.tanh(model.inp(x))
        h = torch.tanh(F.linear(h, weight.detach(), bias.detach()))
        h = torch.tanh(F.linear(h, weight.detach(), bias.detach()))
        h = torch.tanh(F.linear(h, weight, bias))
        loss = ((model.head(h) - y) ** 2).sum()
        g_weight, g_bias = torch.autograd.grad(loss, [weight, bias])
        rows.append(torch.cat([g_weight, g_bias[:, None]], dim=1).reshape(-1))
    return torch.stack(rows)


def test_only_last_calls_gives_the_gradient_of_the_last_call_alone():
    task = SquaredError()
    examples = regression_examples(3, inputs=3, outputs=2)
    _prepared, copy_ = unwrapped(Repeated(), task)
    calls = {"inp": 1, "cell": 3, "head": 1}
    last = copy_.gradients(task, default_collate, examples, ["cell", "head"], False, last_call_only=calls)
    full = copy_.gradients(task, default_collate, examples, ["cell", "head"], False)
    expected = last_call_reference(examples)
    assert relative_error(last["cell"], expected) < 1e-12
    assert relative_error(full["cell"], expected) > 0.05  # the negative control: all three calls differ
    # a module called once is untouched by it
    assert relative_error(last["head"], full["head"]) < 1e-14
    # the patch is gone afterwards: the module's forward is its class's again
    assert "forward" not in copy_.modules["cell"].__dict__
    again = copy_.gradients(task, default_collate, examples, ["cell"], False)
    assert relative_error(again["cell"], full["cell"]) < 1e-14


def test_only_last_calls_as_a_context_detaches_every_call_but_the_last_in_each_forward():
    torch.manual_seed(0)
    cell = nn.Linear(2, 2).double()
    x = torch.randn(1, 2, dtype=torch.float64)
    with _only_last_calls({"cell": cell}, {"cell": 3}, ["cell"]):
        for _forward in range(2):  # two forwards of three calls each: the counter wraps
            outputs = [cell(x) for _ in range(3)]
            assert [o.requires_grad for o in outputs] == [False, False, True]
            assert all(torch.allclose(o, F.linear(x, cell.weight, cell.bias)) for o in outputs)
    assert cell(x).requires_grad  # restored
    # a name called once, or not named, is never patched
    with _only_last_calls({"cell": cell}, {"cell": 1}, ["cell"]):
        assert all(cell(x).requires_grad for _ in range(3))
    with _only_last_calls({"cell": cell}, {"cell": 3}, []):
        assert all(cell(x).requires_grad for _ in range(3))


# ---------------------------------------------------------------------------------------------------------
# _untie and tied_gradients


def tied_examples() -> list[tuple]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 5, (3, 4), generator=generator)
    targets = torch.randint(0, 5, (3, 4), generator=generator)
    return [(ids[i], targets[i]) for i in range(3)]


def tied_reference(examples: list[tuple]) -> tuple[torch.Tensor, list[float]]:
    """By hand, with the embedding's and the head's uses as two separate float64 leaves: the head's own
    gradient per example, and its share ⟨g_head, g_all⟩ / ‖g_all‖² of the shared parameter's whole gradient."""
    shared = TiedLM().emb.weight.detach().double()
    heads, shares = [], []
    for ids, targets in examples:
        embedding = shared.clone().requires_grad_(True)
        head = shared.clone().requires_grad_(True)
        logits = torch.tanh(embedding[ids]) @ head.T
        loss = F.cross_entropy(logits, targets, reduction="sum")
        g_embedding, g_head = torch.autograd.grad(loss, [embedding, head])
        whole = (g_embedding + g_head).reshape(-1)
        heads.append(g_head.reshape(-1))
        shares.append(float(g_head.reshape(-1) @ whole / (whole @ whole)))
    return torch.stack(heads), shares


def test_untie_gives_a_tied_head_its_own_weight_and_leaves_the_other_owner_the_shared_one():
    model = TiedLM().double()
    shared = model.emb.weight
    ties = _untie(model, {"head": model.head})
    assert set(ties) == {"head"}
    other, parameter = ties["head"]
    assert other == "emb" and parameter is shared
    assert model.emb.weight is shared  # the other owner keeps it
    assert model.head.weight is not shared and isinstance(model.head.weight, nn.Parameter)
    assert torch.equal(model.head.weight.detach(), shared.detach())  # same values: same function
    # an untied module is not touched
    plain = nn.Sequential(nn.Linear(2, 2))
    weight = plain[0].weight
    assert _untie(plain, {"0": plain[0]}) == {}
    assert plain[0].weight is weight


class Aliased(nn.Module):
    """One Linear registered under two names (`a` and `b`), each used once: not a tie between two modules."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 3)
        self.b = self.a

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_untie_never_ties_a_module_to_itself():
    model = Aliased().double()
    ties = _untie(model, {"a": model.a})
    assert all(other != name for name, (other, _parameter) in ties.items()), ties


def test_tied_head_gradient_is_its_own_use_and_its_share_matches_a_hand_computation():
    task = TokenCrossEntropy()
    examples = tied_examples()
    prepared, copy_ = unwrapped(TiedLM(), task)
    assert set(copy_.modules) == {"head"}  # kronfluence tracks the Linear head, not the embedding
    assert set(copy_.ties) == {"head"} and copy_.ties["head"][0] == "emb"
    # the prepared model keeps its tie
    assert prepared.get_submodule("head").original_module.weight is prepared.emb.weight

    own = copy_.gradients(task, default_collate, examples, ["head"], measurement=False)
    heads, shares = tied_reference(examples)
    assert relative_error(own["head"], heads) < 1e-12  # the head's own use: what the hooks see

    tied = copy_.tied_gradients(task, default_collate, examples, ["head"], own)
    other, share = tied["head"]
    assert other == "emb"
    assert share == pytest.approx(statistics.median(shares), rel=1e-12)
    assert 0.0 < share < 1.0 and abs(share - 1.0) > 1e-3  # the embedding's use carries a real part
    # a module not in the audited list is left out
    assert copy_.tied_gradients(task, default_collate, examples, [], own) == {}


def test_the_tied_share_keeps_float64_precision():
    task = TokenCrossEntropy()
    examples = tied_examples()
    _prepared, copy_ = unwrapped(TiedLM(), task)
    own = copy_.gradients(task, default_collate, examples, ["head"], measurement=False)
    _other, share = copy_.tied_gradients(task, default_collate, examples, ["head"], own)["head"]
    assert share == pytest.approx(statistics.median(tied_reference(examples)[1]), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# HooksAudit


def test_worst_leaves_nan_out_and_the_summary_lists_only_repeated_calls():
    audit = HooksAudit(
        examples=16,
        queries=4,
        gradients={"a": 1e-7, "b": math.nan},
        factors={"a": 2e-3},
        scores={"all_modules": 1e-5},
        calls={"a": 1, "b": 3},
        last_call={"b": 1e-8},
        tied={"head": ("emb", 0.25)},
    )
    assert audit.worst == 2e-3
    summary = audit.summary()
    assert summary["calls"] == {"b": 3} and summary["last_call"] == {"b": 1e-8}
    assert summary["tied"] == {"head": {"to": "emb", "share": 0.25}}
    assert "left_out" not in summary
    assert math.isnan(HooksAudit(gradients={"a": math.nan}).worst)
    assert "calls" not in HooksAudit(gradients={"a": 0.0}, calls={"a": 1}).summary()
    assert HooksAudit(skipped="no model").summary() == {"skipped": "no model", "seconds": 0.0}


# ---------------------------------------------------------------------------------------------------------
# check_hooks and failing_modules


def by_check(outcome) -> dict[str, list]:
    grouped: dict[str, list] = {}
    for finding in outcome.findings:
        grouped.setdefault(finding.check, []).append(finding)
    return grouped


def test_the_tolerance_is_sqrt_eps_of_the_models_dtype_times_the_threshold():
    thresholds = Thresholds()
    assert hooks_tolerance(torch.float32, thresholds) == pytest.approx(FLOAT32_TOLERANCE, rel=1e-12)
    assert hooks_tolerance(torch.float64, thresholds) == pytest.approx(FLOAT64_TOLERANCE, rel=1e-12)
    assert hooks_tolerance(torch.bfloat16, thresholds) == pytest.approx(math.sqrt(2.0**-7), rel=1e-12)
    doubled = Thresholds.from_mapping({"hooks_error_sqrt_eps": 2.0})
    assert hooks_tolerance(torch.float32, doubled) == pytest.approx(2 * FLOAT32_TOLERANCE, rel=1e-12)


def test_a_module_beyond_tolerance_is_a_fail_and_one_within_is_nothing():
    audit = HooksAudit(examples=16, queries=4, gradients={"bad": 0.5, "good": 1e-6}, calls={"bad": 1, "good": 1})
    outcome = check_hooks(audit, "pairwise_scores", Thresholds())
    grouped = by_check(outcome)
    assert set(grouped) == {"hooks.gradients"}
    (finding,) = grouped["hooks.gradients"]
    assert (finding.severity, finding.subject, finding.stage) == ("fail", "bad", "pairwise_scores")
    assert finding.value == 0.5 and finding.limit == pytest.approx(FLOAT32_TOLERANCE)
    assert finding.cause is None  # called once: the audit measured no cause
    assert failing_modules(audit, Thresholds()) == {"bad": 0.5}
    assert outcome.metrics["worst"] == 0.5 and outcome.metrics["modules"] == 2


def test_the_tolerance_follows_the_models_dtype():
    error = 1e-6  # beyond √eps of float64, within √eps of float32
    for dtype, fails in ((torch.float32, False), (torch.float64, True)):
        audit = HooksAudit(examples=16, queries=4, dtype=dtype, gradients={"m": error})
        outcome = check_hooks(audit, "self_scores", Thresholds())
        assert bool(outcome.findings) is fails, dtype
        assert bool(failing_modules(audit, Thresholds())) is fails, dtype
    # the limit itself is within it (strictly beyond fails)
    limit = hooks_tolerance(torch.float32, Thresholds())
    at_limit = HooksAudit(gradients={"m": limit}, factors={"m": limit})
    assert check_hooks(at_limit, "self_scores", Thresholds()).findings == []
    beyond = HooksAudit(gradients={"m": limit * (1 + 1e-9)})
    assert len(check_hooks(beyond, "self_scores", Thresholds()).findings) == 1


@pytest.mark.parametrize(
    ("calls", "last_call", "cause"),
    [
        (3, 1e-7, "shared-parameters"),  # called 3 times and the hooks agree with the last call alone
        (3, 0.3, None),  # called 3 times, but the last call does not explain it either
        (3, None, None),  # called 3 times, the last call not measured
        (3, math.nan, None),  # not measurable
        (1, 1e-7, None),  # called once: a last-call agreement proves nothing
    ],
)
def test_the_cause_is_shared_parameters_only_when_called_more_than_once_and_the_last_call_agrees(
    calls, last_call, cause
):
    last = {} if last_call is None else {"cell": last_call}
    audit = HooksAudit(examples=16, queries=4, gradients={"cell": 0.77}, calls={"cell": calls}, last_call=last)
    (finding,) = check_hooks(audit, "pairwise_scores", Thresholds()).findings
    assert finding.check == "hooks.gradients" and finding.severity == "fail"
    assert finding.cause == cause
    assert ("runs 3 times per forward" in finding.message) is (calls == 3)
    assert ("last call alone" in finding.message) is (cause is not None)


def test_nan_errors_judge_nothing():
    audit = HooksAudit(
        examples=16,
        queries=4,
        gradients={"a": math.nan},
        factors={"a": math.nan, "b": math.nan},
        scores={"all_modules": math.nan},
        calls={"a": 3},
        last_call={"a": 1e-9},
    )
    outcome = check_hooks(audit, "pairwise_scores", Thresholds())
    assert outcome.findings == []
    assert failing_modules(audit, Thresholds()) == {}
    assert math.isnan(outcome.metrics["worst"])


def test_factors_fail_on_their_own_but_not_again_for_a_module_whose_gradients_fail():
    audit = HooksAudit(
        examples=16,
        queries=4,
        gradients={"a": 0.5, "b": 1e-7},
        factors={"a": 0.2, "b": 0.01, "c": 1e-9},
        scores={"all_modules": 0.004},
    )
    grouped = by_check(check_hooks(audit, "pairwise_scores", Thresholds()))
    assert [f.subject for f in grouped["hooks.gradients"]] == ["a"]
    assert [f.subject for f in grouped["hooks.factors"]] == ["b"]
    # the summed scores include a's wrong gradients: that failure is already explained, not a second one
    assert "hooks.scores" not in grouped
    assert all(f.severity == "fail" for fs in grouped.values() for f in fs)
    assert failing_modules(audit, Thresholds()) == {"a": 0.5, "b": 0.01, "all_modules": 0.004}


def test_the_summed_scores_fail_on_their_own_when_every_module_s_gradients_agree():
    audit = HooksAudit(examples=16, queries=4, gradients={"a": 1e-7, "b": 1e-7}, scores={"all_modules": 0.004})
    (finding,) = check_hooks(audit, "pairwise_scores", Thresholds()).findings
    assert (finding.check, finding.severity, finding.subject) == ("hooks.scores", "fail", "all_modules")


def test_a_tied_weight_is_a_warning_with_the_share_and_cause_shared_parameters():
    audit = HooksAudit(examples=16, queries=4, gradients={"lm_head": 1e-7}, tied={"lm_head": ("transformer.wte", 0.4)})
    outcome = check_hooks(audit, "pairwise_scores", Thresholds())
    (finding,) = outcome.findings
    assert (finding.check, finding.severity, finding.subject) == ("hooks.tied", "warn", "lm_head")
    assert finding.cause == "shared-parameters" and finding.value == 0.4
    assert "transformer.wte" in finding.message and "40%" in finding.message


def test_a_skipped_or_missing_audit_judges_nothing_and_left_out_modules_are_info():
    assert check_hooks(None, "pairwise_scores", Thresholds()).findings == []
    skipped = HooksAudit(skipped="the audit raised", gradients={"a": 0.9})
    assert check_hooks(skipped, "pairwise_scores", Thresholds()).findings == []
    left = HooksAudit(gradients={"a": 1e-8}, left_out={"big": "too large"})
    (finding,) = check_hooks(left, "self_scores", Thresholds()).findings
    assert (finding.check, finding.severity) == ("hooks.left_out", "info") and "big" in finding.message


# ---------------------------------------------------------------------------------------------------------
# explain_recounted_covariance


def recounted(subject: str = "block.0"):
    return warn(
        "covariance.examples_equal",
        f"{subject} saw 256 examples for its activation covariance but 128 for its gradient covariance.",
        subject=subject,
        value=128.0,
        limit=0.0,
    )


def test_a_recounted_covariance_that_agrees_with_plain_forwards_becomes_info():
    findings = [recounted("block.0"), recounted("block.2")]
    audit = HooksAudit(factors={"block.0": 1.6e-8, "block.2": 1.9e-8})
    explained = explain_recounted_covariance(findings, audit, Thresholds())
    assert [f.severity for f in explained] == ["info", "info"]
    assert all("agrees with plain forward passes" in f.message for f in explained)
    assert [f.subject for f in explained] == ["block.0", "block.2"]
    assert [f.severity for f in findings] == ["warn", "warn"]  # the input is not mutated


def test_a_recounted_covariance_stays_a_warning_when_the_factor_error_is_beyond_tolerance():
    findings = [recounted("block.0"), recounted("block.2"), recounted("block.4")]
    audit = HooksAudit(factors={"block.0": 1e-2, "block.2": math.nan})  # block.4 not measured at all
    kept = explain_recounted_covariance(findings, audit, Thresholds())
    assert [f.severity for f in kept] == ["warn", "warn", "warn"]
    assert [f.message for f in kept] == [f.message for f in findings]
    # the tolerance is the model dtype's: 1e-6 explains it for a float32 model, not for a float64 one
    small = HooksAudit(dtype=torch.float32, factors={"block.0": 1e-6})
    assert explain_recounted_covariance([recounted()], small, Thresholds())[0].severity == "info"
    small64 = HooksAudit(dtype=torch.float64, factors={"block.0": 1e-6})
    assert explain_recounted_covariance([recounted()], small64, Thresholds())[0].severity == "warn"


def test_explain_recounted_covariance_touches_nothing_else():
    other = warn("covariance.symmetric", "block.0 is not symmetric.", subject="block.0", stage="covariance")
    already = info("covariance.examples_equal", "fine.", subject="block.0", stage="covariance")
    audit = HooksAudit(factors={"block.0": 0.0})
    assert explain_recounted_covariance([other, already], audit, Thresholds()) == [other, already]
    # without an audit, or a skipped one, nothing changes
    assert explain_recounted_covariance([recounted()], None, Thresholds())[0].severity == "warn"
    skipped = HooksAudit(skipped="raised", factors={"block.0": 0.0})
    assert explain_recounted_covariance([recounted()], skipped, Thresholds())[0].severity == "warn"
