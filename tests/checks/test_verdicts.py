"""Verdicts that combine two measurements (`checks/verdicts.py`): a hypothesis made before training, and what
the probes then measured."""

from __future__ import annotations

from influence_doctor.audit.hooks import HooksAudit
from influence_doctor.checks.coverage import check_frozen
from influence_doctor.checks.verdicts import with_frozen_effect, with_measured_ties
from influence_doctor.findings import warn

EFFECT = "Measured on 64 examples at the same sampling seed: pairwise rankings ... agree at 0.914"


def tied_warning(subject: str = "lm_head"):
    return warn(
        "preflight.tied_weights",
        f"{subject}'s weight is tied to wte.",
        subject=subject,
        cause="shared-parameters",
        stage="train",
    )


def test_a_tie_the_audit_measured_leaves_the_preflight_hypothesis_as_information_with_the_share():
    findings = [tied_warning(), tied_warning("other_head")]
    audit = HooksAudit(examples=16, queries=4, tied={"lm_head": ("wte", 0.49)})
    measured, unmeasured = with_measured_ties(findings, audit)
    assert measured.severity == "info" and "49%" in measured.message and "hooks.tied" in measured.message
    assert unmeasured.severity == "warn" and unmeasured.message == findings[1].message


def test_without_an_audit_the_preflight_tie_stays_a_warning():
    findings = [tied_warning()]
    assert with_measured_ties(findings, None) == findings
    assert with_measured_ties(findings, HooksAudit(skipped="too large", tied={"lm_head": ("wte", 0.5)})) == findings


def test_the_frozen_effect_is_added_once_however_often_it_is_joined():
    findings = check_frozen(["base"], ["lora_A"]).findings
    once = with_frozen_effect(findings, EFFECT)
    twice = with_frozen_effect(once, EFFECT)
    assert twice[0].message.count(EFFECT) == 1 and twice == once
    assert twice[0].severity == "warn"  # the effect is information for a choice, never a verdict
