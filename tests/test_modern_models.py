"""Sanity of the pipeline factories in tests/modern_models.py: each builds, its forward runs, each construct
computes what its control computes, and each is the construct it claims to be (a module called three times,
a checkpoint that recomputes, PyTorch's attention, a root Linear, LoRA adapters, a tied head). Nothing here
runs kronfluence or the doctor."""

from __future__ import annotations

import pytest
import torch
from kronfluence.arguments import FactorArguments, ScoreArguments
from torch import nn

from influence_doctor import Pipeline, TrainingMonitor
from tests import modern_models as mm

REGRESSION = [
    "shared_cell",
    "unshared_cell",
    "checkpointed_nonreentrant",
    "checkpointed_reentrant",
    "uncheckpointed",
    "uncompiled",
    "bare_linear",
    "wrapped_linear",
]
FAST = [*REGRESSION, "transformer_encoder", "true_fisher_classifier", "empirical_fisher_classifier"]
ALL = [*FAST, "compiled", "lora_finetune", "gpt2_small_shape"]


def built(factory: str) -> tuple[Pipeline, nn.Module]:
    pipeline = getattr(mm, factory)()
    return pipeline, pipeline.model()


def trained(pipeline: Pipeline, model: nn.Module) -> TrainingMonitor:
    monitor = TrainingMonitor()
    pipeline.train(model, pipeline.train_dataset, monitor)
    return monitor


def calls_of(model: nn.Module, names: list[str], inputs) -> dict[str, int]:
    counts = dict.fromkeys(names, 0)
    handles = []
    for name in names:

        def hook(_module, _inputs, _output, name=name):
            counts[name] += 1

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    model(inputs)
    for handle in handles:
        handle.remove()
    return counts


def test_every_factory_is_zero_argument_named_uniquely_and_deterministic():
    pipelines = {}
    for factory in ALL:
        if factory == "compiled":
            continue  # needs a C++ compiler to build: tested below
        pipeline = getattr(mm, factory)()
        assert isinstance(pipeline, Pipeline)
        assert getattr(mm, factory)().train_dataset[0][0].equal(pipeline.train_dataset[0][0])
        pipelines[factory] = pipeline
    assert len({p.name for p in pipelines.values()}) == len(pipelines)


@pytest.mark.parametrize("factory", FAST)
def test_each_fast_factory_builds_forwards_and_trains(factory):
    pipeline, model = built(factory)
    x, y = pipeline.train_dataset[:4]
    assert torch.isfinite(model(x)).all()
    loss = pipeline.task.compute_train_loss((x, y), model)
    assert loss.shape == () and torch.isfinite(loss)
    monitor = trained(pipeline, model)
    assert monitor.loss[-1] < monitor.loss[0]
    assert not model.training


def test_the_shared_cell_is_one_linear_called_three_times_and_the_control_computes_the_same():
    shared, unshared = mm.UnrolledBlock(shared=True), mm.UnrolledBlock(shared=False)
    x = mm.synthetic_regression(16, seed=3).tensors[0]
    assert torch.allclose(shared(x), unshared(x))
    assert calls_of(shared, ["inp", "cell", "head"], x) == {"inp": 1, "cell": mm.STEPS, "head": 1}
    cells = [f"cells.{i}" for i in range(mm.STEPS)]
    assert calls_of(unshared, cells, x) == dict.fromkeys(cells, 1)
    linears = lambda m: {n: tuple(p.weight.shape) for n, p in m.named_modules() if isinstance(p, nn.Linear)}  # noqa: E731
    assert sorted(linears(unshared).values()) == sorted([*linears(shared).values()] + [(mm.WIDTH, mm.WIDTH)] * 2)


def test_checkpointing_recomputes_the_block_and_changes_nothing_else():
    x = mm.synthetic_regression(16, seed=3).tensors[0]
    plain = mm.BlockMLP(None)
    reference = plain(x)
    reference.sum().backward()
    for reentrant in (False, True):
        model = mm.BlockMLP(use_reentrant=reentrant)
        requires_grad = []
        model.block[0].register_forward_hook(lambda _m, _i, out, seen=requires_grad: seen.append(out.requires_grad))
        output = model(x)
        output.sum().backward()
        assert torch.equal(output, reference)
        for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
            assert torch.allclose(p.grad, q.grad, atol=1e-7), name
        # one forward, one recomputation in backward; under reentrant checkpointing the first runs without grad
        assert requires_grad == ([False, True] if reentrant else [True, True])


def test_the_checkpointed_pipelines_train_to_the_controls_weights():
    weights = {}
    for factory in ("checkpointed_nonreentrant", "checkpointed_reentrant", "uncheckpointed"):
        pipeline, model = built(factory)
        trained(pipeline, model)
        weights[factory] = model.state_dict()
    for factory in ("checkpointed_nonreentrant", "checkpointed_reentrant"):
        for name, value in weights["uncheckpointed"].items():
            assert torch.allclose(weights[factory][name], value, atol=1e-6), (factory, name)


def test_the_encoder_uses_pytorchs_attention_with_its_linear_subclass_and_bare_weight():
    _pipeline, model = built("transformer_encoder")
    (attention,) = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert type(attention.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(attention.out_proj, nn.Linear)
    assert isinstance(attention.in_proj_weight, nn.Parameter)
    assert attention.in_proj_weight.shape == (3 * mm.D_MODEL, mm.D_MODEL)


def test_the_bare_linear_is_a_root_module_and_its_wrapped_control_computes_the_same():
    _pipeline, bare = built("bare_linear")
    _pipeline, wrapped = built("wrapped_linear")
    assert type(bare) is nn.Linear and not list(bare.children())
    assert isinstance(wrapped, nn.Sequential) and type(wrapped[0]) is nn.Linear
    x = mm.synthetic_regression(8, seed=3).tensors[0]
    assert torch.equal(bare(x), wrapped(x))


def test_the_fisher_classifiers_differ_only_in_the_empirical_fisher():
    true, empirical = mm.true_fisher_classifier(), mm.empirical_fisher_classifier()
    assert len(true.train_dataset) == len(empirical.train_dataset) == 256
    assert true.factor_args == FactorArguments()  # kronfluence's defaults: the true Fisher
    assert empirical.factor_args == FactorArguments(use_empirical_fisher=True)
    assert true.score_args == empirical.score_args == ScoreArguments()
    assert true.score_args.damping_factor == 1e-8
    assert torch.equal(true.train_dataset.tensors[1], empirical.train_dataset.tensors[1])
    assert len(set(true.train_dataset.tensors[1].tolist())) == mm.CLASSIFIER_CLASSES


def test_torch_compile_is_available_or_says_why():
    try:
        mm.require_torch_compile()
    except mm.TorchCompileUnavailable as error:
        assert "torch.compile" in str(error)


@pytest.mark.slow
def test_the_compiled_model_computes_what_the_control_computes():
    try:
        pipeline = mm.compiled()
    except mm.TorchCompileUnavailable as error:
        pytest.skip(str(error))
    model = pipeline.model()
    assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(model._orig_mod, mm.BlockMLP)
    x = pipeline.train_dataset.tensors[0][: mm.BATCH]
    assert torch.allclose(model(x), mm.BlockMLP(None)(x), atol=1e-6)


def test_the_linear_gpt2_computes_what_the_conv1d_gpt2_computes():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    linear = mm.build_tiny_gpt2()
    torch.manual_seed(0)
    from transformers import GPT2LMHeadModel

    conv = GPT2LMHeadModel(linear.config).eval()
    assert not any(isinstance(m, Conv1D) for m in linear.modules())
    assert any(isinstance(m, Conv1D) for m in conv.modules())
    ids = mm.counting_tokens(2, seed=0).tensors[0]
    assert torch.allclose(linear(input_ids=ids).logits, conv(input_ids=ids).logits, atol=1e-5)
    assert linear.lm_head.weight is linear.transformer.wte.weight


def test_lora_trains_only_the_adapters():
    pytest.importorskip("peft")
    pipeline, model = built("lora_finetune")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    adapters = mm.lora_modules(model)
    assert len(adapters) == 2 * 4 * 2  # lora_A and lora_B on c_attn, attn.c_proj, c_fc, mlp.c_proj, two layers
    base = mm.build_tiny_gpt2()
    ids = pipeline.query_dataset.tensors[0]
    assert torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits)  # lora_B starts at zero
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    monitor = trained(pipeline, model)
    assert monitor.loss[-1] < monitor.loss[0]
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == trainable
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sum(n.endswith(".base_layer") for n in linears) == 8 and linears[-1].endswith("lm_head")
    loss = pipeline.task.compute_train_loss(pipeline.train_dataset[:2], model)
    assert torch.isfinite(loss)


@pytest.mark.slow
def test_the_gpt2_small_shape_is_gpt2_small_with_its_head_tied():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    pipeline = mm.gpt2_small_shape()
    assert pipeline.train is None
    model = pipeline.model()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.shape == (50257, 768) and len(model.transformer.h) == 12
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 49
    with torch.no_grad():
        loss = pipeline.task.compute_train_loss(pipeline.train_dataset[:1], model)
    assert torch.isfinite(loss)
