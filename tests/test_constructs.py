"""End to end with real kronfluence: the doctor on the constructs of `tests/modern_models.py`, each beside its
negative control (same seed, same weights, the construct removed). Each pipeline is diagnosed once per
xdist worker (a module-scoped cache); several tests read the same report.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from influence_doctor import diagnose
from influence_doctor.doctor import Report
from tests import modern_models as mm

HOOK_FAILS = ("hooks.gradients", "hooks.factors", "hooks.scores")
CONTROL_HOOKS_ERROR = 1e-4
"""A clean float32 model's hooks agree with float64 autograd at ~1e-7 (float32 rounding); the tolerance is
√eps(float32) = 3.5e-4. A missed call is O(1)."""


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    cache: dict[str, Report] = {}

    def get(factory: str) -> Report:
        if factory not in cache:
            pipeline = getattr(mm, factory)()
            cache[factory] = diagnose(pipeline, out_dir=tmp_path_factory.mktemp(factory), progress=False)
        return cache[factory]

    return get


# ---------------------------------------------------------------------------------------------------------
# Helpers


def problems(report: Report) -> list[dict[str, Any]]:
    return report.document["pipeline"]["diagnosis"]


def hooks_fails(report: Report) -> list:
    return [f for f in report.findings if f.check in HOOK_FAILS and f.severity == "fail"]


def hooks_of(report: Report) -> dict[str, Any]:
    return report.document["fidelity"]["hooks"]


def stage_status(report: Report, name: str) -> str:
    stages = report.document["stages"]
    if isinstance(stages, dict):
        return stages[name]["status"]
    (stage,) = [s for s in stages if s["name"] == name]
    return stage["status"]


def tried_rungs(report: Report) -> dict[str, str]:
    """Every rung the doctor tried: applied (its remedy's outcome) or rehearsed and skipped ("skipped")."""
    tried = {}
    for remedy in report.remedies:
        if remedy["rung"] != "(none)":
            tried[remedy["rung"]] = remedy["outcome"]
        for skipped in remedy.get("skipped") or []:
            tried.setdefault(skipped["rung"], "skipped")
    return tried


def text_of(report: Report) -> str:
    """The report as a person reads it: report.json on disk (and the document it was written from)."""
    return report.json_path.read_text() + json.dumps(report.document, default=str)


def assert_explained(report: Report) -> None:
    unexplained = [p for p in problems(report) if p["cause"] is None]
    assert not unexplained, unexplained
    assert all(p.cause is not None for p in report.problems)


def assert_healthy_and_hooks_clean(report: Report) -> None:
    assert report.status == "healthy", (report.status, problems(report))
    assert problems(report) == []
    assert hooks_fails(report) == []
    hooks = hooks_of(report)
    assert "skipped" not in hooks, hooks
    assert hooks["gradients"], hooks  # the audit ran, on every tracked module
    assert hooks["worst"] < CONTROL_HOOKS_ERROR, hooks


# ---------------------------------------------------------------------------------------------------------
# A module applied three times per forward


def test_shared_cell_is_sick_with_shared_parameters_naming_cell(reports):
    report = reports("shared_cell")
    assert report.status != "healthy"
    assert report.status == "sick"  # shared:true does not heal it: nothing else may claim to
    shared = [p for p in report.problems if p.cause == "shared-parameters"]
    assert shared, problems(report)
    assert any("cell" in p.subjects or "cell" in p.message for p in shared)
    assert any("3 times per forward" in p.message for p in shared)
    assert_explained(report)
    (finding,) = [f for f in report.findings if f.check == "hooks.gradients" and f.severity == "fail"]
    assert (finding.subject, finding.cause) == ("cell", "shared-parameters")


def test_shared_cell_problem_gives_its_advice_once(reports):
    (problem,) = [p for p in reports("shared_cell").problems if p.cause == "shared-parameters"]
    assert problem.message.count("give each call its own module") == 1, problem.message


def test_shared_cell_tried_shared_true_and_did_not_apply_it(reports):
    report = reports("shared_cell")
    tried = tried_rungs(report)
    assert "shared:true" in tried, report.remedies
    assert tried["shared:true"] not in ("healed", "applied"), report.remedies
    assert not any(remedy["outcome"] == "healed" for remedy in report.remedies)
    assert not any(rung.startswith("strategy:") for rung in tried)  # a missed call has no method fallback
    assert "has_shared_parameters" not in json.dumps(report.prescription, default=str)


def test_shared_cell_hooks_miss_the_cell_and_only_the_cell(reports):
    hooks = hooks_of(reports("shared_cell"))
    gradients = hooks["gradients"]
    assert set(gradients) == {"inp", "cell", "head"}
    assert gradients["cell"] > 0.1
    assert all(error < CONTROL_HOOKS_ERROR for module, error in gradients.items() if module != "cell"), gradients
    assert hooks["calls"] == {"cell": 3}
    assert hooks["last_call"]["cell"] < CONTROL_HOOKS_ERROR  # the hooks see the last call alone
    assert hooks["worst"] == pytest.approx(gradients["cell"])


def test_unshared_cell_control_is_healthy_with_clean_hooks(reports):
    report = reports("unshared_cell")
    assert_healthy_and_hooks_clean(report)
    hooks = hooks_of(report)
    assert set(hooks["gradients"]) == {"inp", "cells.0", "cells.1", "cells.2", "head"}
    assert "calls" not in hooks and "last_call" not in hooks  # every module runs once


# ---------------------------------------------------------------------------------------------------------
# Activation checkpointing


def recounted(report: Report) -> list:
    return [f for f in report.findings if f.check == "covariance.examples_equal"]


def test_nonreentrant_checkpointing_is_healthy_and_its_recount_is_explained_as_info(reports):
    report = reports("checkpointed_nonreentrant")
    assert_healthy_and_hooks_clean(report)
    findings = recounted(report)
    assert {f.subject for f in findings} == {"block.0", "block.2"}  # the checkpointed block's Linears
    assert all(f.severity == "info" for f in findings), findings
    assert all("agrees with plain forward passes" in f.message for f in findings)
    assert stage_status(report, "covariance") == "ok"


def test_uncheckpointed_control_is_healthy_and_counts_each_example_once(reports):
    report = reports("uncheckpointed")
    assert_healthy_and_hooks_clean(report)
    assert recounted(report) == []  # the recount is checkpointing's, not the model's


def test_nonreentrant_checkpointing_changes_nothing_the_hooks_compute(reports):
    checkpointed = hooks_of(reports("checkpointed_nonreentrant"))
    plain = hooks_of(reports("uncheckpointed"))
    assert set(checkpointed["gradients"]) == set(plain["gradients"])
    for module, error in plain["gradients"].items():
        assert checkpointed["gradients"][module] == pytest.approx(error, rel=1e-3, abs=1e-9)


def test_reentrant_checkpointing_is_healed_by_the_non_reentrant_rung(reports):
    report = reports("checkpointed_reentrant")
    assert report.status == "healed", problems(report)
    assert any(p["cause"] == "recomputed-forward" for p in problems(report)), problems(report)
    assert_explained(report)
    healed = [r for r in report.remedies if r["outcome"] == "healed"]
    assert [r["rung"] for r in healed] == ["checkpoint:non-reentrant"]
    assert healed[0]["cause"] == "recomputed-forward"
    assert not any(rung.startswith("strategy:") for rung in tried_rungs(report))
    assert report.prescription.get("checkpointing") == "non-reentrant"
    assert "use_reentrant=False" in report.prescription.get("python", "")


def test_the_healed_reentrant_run_explains_its_recount_as_the_nonreentrant_one_does(reports):
    report = reports("checkpointed_reentrant")
    assert [f for f in recounted(report) if f.severity == "warn"] == []


# ---------------------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.slow
def test_compiled_and_its_control_are_healthy_with_clean_hooks(reports):
    try:
        mm.require_torch_compile()
    except mm.TorchCompileUnavailable as error:
        pytest.skip(str(error))
    report = reports("compiled")
    assert_healthy_and_hooks_clean(report)
    assert {m.rpartition("_orig_mod.")[2] for m in hooks_of(report)["gradients"]} == {
        "inp",
        "block.0",
        "block.2",
        "head",
    }


def test_uncompiled_control_is_healthy_with_clean_hooks(reports):
    report = reports("uncompiled")
    assert_healthy_and_hooks_clean(report)
    assert set(hooks_of(report)["gradients"]) == {"inp", "block.0", "block.2", "head"}


# ---------------------------------------------------------------------------------------------------------
# nn.TransformerEncoder; a root Linear


def test_transformer_encoder_names_what_kronfluence_cannot_wrap(reports):
    report = reports("transformer_encoder")
    assert report.status == "sick"
    unsupported = [p for p in problems(report) if p["cause"] == "unsupported-module"]
    assert unsupported, problems(report)
    message = " ".join(p["message"] for p in unsupported)
    assert "NonDynamicallyQuantizableLinear" in message
    assert "out_proj" in message
    assert "in_proj_weight" in message
    assert_explained(report)


def test_transformer_encoder_goes_on_without_an_error_or_a_method_change(reports):
    report = reports("transformer_encoder")
    assert stage_status(report, "train") != "error"
    assert all(stage_status(report, s) != "error" for s in ("covariance", "pairwise_scores", "self_scores"))
    assert "Traceback" not in text_of(report)
    assert not any(rung.startswith("strategy:") for rung in tried_rungs(report))
    # the diagnosis went on with what kronfluence tracks, and the prescription names exactly that
    tracked = report.prescription.get("tracked_modules")
    assert tracked and not any("self_attn" in m for m in tracked), report.prescription
    assert hooks_fails(report) == []
    assert set(hooks_of(report)["gradients"]) == set(tracked)


def test_bare_linear_is_unsupported_with_the_fix_and_no_recursion_error(reports):
    report = reports("bare_linear")
    assert report.status == "sick"
    unsupported = [p for p in problems(report) if p["cause"] == "unsupported-module"]
    assert unsupported, problems(report)
    assert any("nn.Sequential" in p["message"] for p in unsupported)
    assert_explained(report)
    assert "RecursionError" not in text_of(report)
    assert "maximum recursion depth" not in text_of(report)
    assert stage_status(report, "train") != "error"


def test_wrapped_linear_control_is_healthy(reports):
    report = reports("wrapped_linear")
    assert_healthy_and_hooks_clean(report)
    assert set(hooks_of(report)["gradients"]) == {"0"}


# ---------------------------------------------------------------------------------------------------------
# The sampling seed: a 256-example classifier at kronfluence's defaults, and with the empirical Fisher


def test_a_true_fisher_classifier_gets_fisher_sampling_noise_with_the_agreement_and_the_options(reports):
    report = reports("true_fisher_classifier")
    (noise,) = [f for f in report.findings if f.check == "scores.sampling_seed"]
    assert (noise.severity, noise.cause) == ("warn", "fisher-sampling-noise")  # never a fail, never applied
    seed = report.document["fidelity"]["seed"]
    assert seed["examples"] == mm.CLASSIFIER_EXAMPLES and seed["median_spearman"] < 0.9
    assert noise.value == pytest.approx(seed.get("projected", seed)["median_spearman"])
    assert seed["worst_spearman"] <= seed["median_spearman"] and 0.0 <= seed["top_overlap"] <= 1.0
    assert f"{seed['median_spearman']:.3f}" in noise.message
    options = seed["options"]
    assert options["empirical_fisher"]["seed_median_spearman"] == 1.0
    assert -1.0 <= options["empirical_fisher"]["against_true_fisher"] <= 1.0
    assert 0.0 < options["damping_heuristic"]["seed_median_spearman"] <= 1.0
    assert "use_empirical_fisher=True" in noise.message and "damping_factor=None" in noise.message
    assert not any(f.severity == "fail" for f in report.findings)
    assert all(r["rung"] != "sampling-seed:1" for r in report.remedies)  # nothing was changed for it
    assert "use_empirical_fisher" not in json.dumps(report.prescription, default=str)


def test_the_empirical_fisher_control_samples_nothing_and_gets_no_seed_warning(reports):
    report = reports("empirical_fisher_classifier")
    assert not [f for f in report.findings if f.check == "scores.sampling_seed"]
    assert "skipped" in report.document["fidelity"]["seed"]
    assert report.status == "healthy"


# ---------------------------------------------------------------------------------------------------------
# A PEFT LoRA fine-tune of a tiny Hugging Face GPT-2: kronfluence tracks the frozen base layers too


def test_a_lora_fine_tune_gets_frozen_tracked_naming_the_base_layers_with_the_same_seed_effect(reports):
    report = reports("lora_finetune")
    (frozen,) = [f for f in report.findings if f.check == "train.frozen_tracked"]
    assert (frozen.severity, frozen.cause) == ("warn", "frozen-tracked")
    named = frozen.subject.split(", ")
    assert named and all(".base_layer" in m or m.endswith("lm_head") for m in named), named
    assert any(".base_layer" in m for m in named)
    assert frozen.message.count("Measured on") == 1 and "at the same sampling seed" in frozen.message
    assert "median per-query Spearman" in frozen.message
    trained = report.document["stages"]
    trained = next(s for s in trained if s["name"] == "train")["metrics"]["frozen_tracked"]["trained"]
    assert trained and all(".lora_" in m for m in trained), trained
    assert not any(f.severity == "fail" for f in report.findings)
    assert "frozen-tracked" not in [p.cause for p in report.problems]  # a choice to make, not a sickness


def test_the_lora_head_tied_to_the_embedding_is_measured_once_by_the_audit(reports):
    report = reports("lora_finetune")
    (tied,) = [f for f in report.findings if f.check == "hooks.tied"]
    assert tied.severity == "warn" and "wte" in tied.message and 0.0 < tied.value < 1.0
    (hypothesis,) = [f for f in report.findings if f.check == "preflight.tied_weights"]
    assert hypothesis.severity == "info" and "hooks.tied" in hypothesis.message


def test_a_model_trained_in_full_tracks_nothing_frozen(reports):
    for control in ("unshared_cell", "wrapped_linear", "empirical_fisher_classifier"):
        assert not [f for f in reports(control).findings if f.check == "train.frozen_tracked"], control
