"""`scores.precision` and `scores.reference_finite`: the configured scores against float64, on the probe
and, where the probe disagrees, on the whole rehearsal."""

from __future__ import annotations

import torch

from influence_doctor.checks.precision import check_reference_finite, check_score_agreement, score_agreement
from influence_doctor.checks.thresholds import Thresholds

T = Thresholds()


def reversed_rankings() -> dict[str, float]:
    scores = torch.arange(32, dtype=torch.float64).reshape(2, 16)
    return score_agreement(scores.flip(-1), scores)


def identical_rankings() -> dict[str, float]:
    scores = torch.arange(32, dtype=torch.float64).reshape(2, 16)
    return score_agreement(scores, scores)


def test_a_disagreement_on_the_probe_alone_fails():
    (finding,) = check_score_agreement("pairwise_scores", "pairwise", reversed_rankings(), torch.float32, T).findings
    assert finding.severity == "fail" and finding.cause == "low-precision-loss"


def test_a_disagreement_the_whole_rehearsal_does_not_show_is_the_probes_size():
    outcome = check_score_agreement(
        "pairwise_scores", "pairwise", reversed_rankings(), torch.float32, T, whole=identical_rankings()
    )
    (finding,) = outcome.findings
    assert finding.severity == "info" and "the probe's size" in finding.message
    assert outcome.metrics["vs_float64_rehearsal"]["median_spearman"] == 1.0


def test_a_disagreement_the_whole_rehearsal_shows_fails_with_its_numbers():
    outcome = check_score_agreement(
        "pairwise_scores", "pairwise", reversed_rankings(), torch.float32, T, whole=reversed_rankings()
    )
    (finding,) = outcome.findings
    assert finding.severity == "fail" and "on the whole rehearsal" in finding.message


def test_agreement_gives_no_finding():
    assert check_score_agreement("pairwise_scores", "pairwise", identical_rankings(), torch.float32, T).findings == []


def test_undefined_float64_scores_on_the_probe_alone_are_the_probes_size():
    probe, whole = {"reference_nonfinite": 3.0}, {"reference_nonfinite": 0.0}
    (alone,) = check_reference_finite("pairwise_scores", "pairwise", probe).findings
    (sized,) = check_reference_finite("pairwise_scores", "pairwise", probe, whole).findings
    assert alone.severity == "fail" and sized.severity == "info" and "the probe's size" in sized.message
