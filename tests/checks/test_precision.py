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


def test_all_rows_at_once_give_scipys_spearman_and_the_top_overlap_of_each_row():
    """The finite fast path against scipy's Spearman row by row (ties averaged, a constant row undefined)."""
    import math
    import statistics

    import pytest
    from scipy import stats

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(12, 40, generator=generator, dtype=torch.float64)
    b = a + 0.7 * torch.randn(12, 40, generator=generator, dtype=torch.float64)
    a[:4], b[2:6] = a[:4].round(), b[2:6].round()  # ties on either side
    a[7] = 3.0  # a constant row: no ranking
    agreement = score_agreement(a, b)
    with pytest.warns(stats.ConstantInputWarning):  # scipy says so for the constant row
        rows = [stats.spearmanr(x.numpy(), y.numpy()).statistic for x, y in zip(a, b, strict=True)]
    finite = [float(value) for value in rows if not math.isnan(value)]
    assert len(finite) == 11
    assert agreement["median_spearman"] == pytest.approx(statistics.median(finite), abs=1e-12)
    assert agreement["worst_spearman"] == pytest.approx(min(finite), abs=1e-12)
    overlaps = []
    for x, y in zip(a, b, strict=True):
        overlaps.append(len(set(torch.topk(x, 10).indices.tolist()) & set(torch.topk(y, 10).indices.tolist())) / 10)
    assert agreement["top_overlap"] == pytest.approx(statistics.median(overlaps))
    with_nan = a.clone()
    with_nan[0, 0] = math.nan  # the row-by-row path, over the entries finite in both
    assert score_agreement(with_nan, b)["worst_spearman"] == pytest.approx(min(finite), abs=0.05)
