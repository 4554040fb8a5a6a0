"""How much a fix moved the scores: rank and linear agreement with the least-regularized configuration
that gave trustworthy scores (the closest thing to what the user asked for)."""

from __future__ import annotations

import math
from typing import Any

import torch
from scipy import stats

from influence_doctor.checks.precision import rank_agreement


def pearson(first: torch.Tensor, second: torch.Tensor) -> float:
    a, b = first.double().flatten().cpu(), second.double().flatten().cpu()
    if a.shape != b.shape:
        return math.nan
    keep = torch.isfinite(a) & torch.isfinite(b)
    if int(keep.sum()) < 3 or float(a[keep].std()) == 0.0 or float(b[keep].std()) == 0.0:
        return math.nan
    return float(stats.pearsonr(a[keep].numpy(), b[keep].numpy()).statistic)


def compare_scores(final: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Spearman and Pearson per score kind present in both."""
    return {
        kind: {
            "spearman": rank_agreement(final[kind], reference[kind]),
            "pearson": pearson(final[kind], reference[kind]),
        }
        for kind in final
        if kind in reference
    }


def fidelity_against_least_regularized(snapshots: list[Any], min_spearman: float) -> dict[str, Any]:
    """Compare the final configuration with the earliest earlier one whose scores were trustworthy:
    all finite, and not shown wrong by a measurement (finite rounding noise is not a reference).

    Rungs climb from least to most distorting, so the earliest trusted snapshot is the least
    regularized. When there is none (the configuration as given was never right), say so.
    """
    if len(snapshots) < 2:
        return {"reference": None, "reason": "no remedy was applied"}
    final = snapshots[-1]
    earlier = [s for s in snapshots[:-1] if s.trusted]
    if not final.trusted:
        return {"reference": None, "reason": "the final configuration's scores are not finite or not trustworthy"}
    if not earlier:
        return {
            "reference": None,
            "reason": "no less-regularized configuration gave finite, trustworthy scores: there is nothing finite "
            "to compare to",
        }
    reference = earlier[0]
    agreement = compare_scores(final.scores, reference.scores)
    worst = min((v["spearman"] for v in agreement.values() if not math.isnan(v["spearman"])), default=math.nan)
    return {
        "reference": reference.label,
        "reference_regularization": reference.regularization,
        "final_regularization": final.regularization,
        "agreement": agreement,
        "min_spearman": worst,
        "limit": min_spearman,
        "below_limit": bool(not math.isnan(worst) and worst < min_spearman),
    }
