"""Headroom of accumulated quantities, projected from the rehearsal to the full run.

kronfluence accumulates covariance and Lambda matrices as sums over examples and divides at the end, so
a float16 sum that fits on 1,024 examples can pass 65504 on the full data set; the largest score grows
with the number of (query, example) pairs it is the maximum of. The growth is measured, not assumed:
the largest magnitude at two sizes (the probe subsample and the rehearsal) gives an exponent, and the
projection is that measured growth carried to the full size. Pure: numbers in, findings out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from influence_doctor.causes import FP16_OVERFLOW
from influence_doctor.checks.measures import max_abs_finite
from influence_doctor.checks.outcome import CheckOutcome, dtype_name, fmt
from influence_doctor.checks.scores import total_scores
from influence_doctor.checks.thresholds import Thresholds, max_value
from influence_doctor.findings import finding, warn

SCORE_SUBJECTS = {"pairwise_scores": "pairwise", "self_scores": "self"}

MAX_GROWTH = 1.0
"""A sum of n terms grows at most linearly in n (its largest entry sums non-negative squares), and a
maximum over n draws slower: a measured exponent above 1 is noise between the two sizes."""


@dataclass(frozen=True)
class Headroom:
    """One accumulated quantity: its largest magnitude at two sizes, the growth between them, projected."""

    subject: str
    stage: str
    dtype: str
    size_probe: float  # examples (or query × example pairs) behind max_probe
    max_probe: float
    size_rehearsal: float
    max_rehearsal: float
    size_full: float
    growth: float  # exponent: max ∝ size**growth between the two measured sizes
    max_projected: float
    dtype_max: float

    @property
    def share_projected(self) -> float:
        return self.max_projected / self.dtype_max if self.dtype_max > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def growth_exponent(size_small: float, max_small: float, size_large: float, max_large: float) -> float:
    """log(max_large/max_small) / log(size_large/size_small), in [0, MAX_GROWTH]; linear when unmeasurable."""
    if not (size_large > size_small > 0) or not (max_large > 0 and max_small > 0):
        return MAX_GROWTH
    if not (math.isfinite(max_large) and math.isfinite(max_small)):
        return MAX_GROWTH
    exponent = math.log(max_large / max_small) / math.log(size_large / size_small)
    return min(max(exponent, 0.0), MAX_GROWTH)


def project_headroom(
    subject: str,
    stage: str,
    dtype: torch.dtype,
    probe: tuple[float, float],
    rehearsal: tuple[float, float],
    size_full: float,
) -> Headroom:
    """Carry the largest magnitude measured at (size, max) `probe` and `rehearsal` to `size_full`."""
    (size_probe, max_probe), (size_rehearsal, max_rehearsal) = probe, rehearsal
    growth = growth_exponent(size_probe, max_probe, size_rehearsal, max_rehearsal)
    scale = (size_full / size_rehearsal) ** growth if size_rehearsal > 0 and size_full > size_rehearsal else 1.0
    return Headroom(
        subject=subject,
        stage=stage,
        dtype=dtype_name(dtype) or "",
        size_probe=float(size_probe),
        max_probe=float(max_probe),
        size_rehearsal=float(size_rehearsal),
        max_rehearsal=float(max_rehearsal),
        size_full=float(size_full),
        growth=growth,
        max_projected=float(max_rehearsal) * scale,
        dtype_max=max_value(dtype),
    )


def crossing(headroom: Headroom) -> tuple[float, float]:
    """The sizes between which the largest |entry| reaches the dtype's max: at the measured growth, and at
    the fastest growth a sum can have (linear): (earliest, as measured), in the units of `size_full`."""
    if headroom.max_rehearsal <= 0 or headroom.size_rehearsal <= 0:
        return math.inf, math.inf
    ratio = headroom.dtype_max / headroom.max_rehearsal
    earliest = headroom.size_rehearsal * ratio ** (1.0 / MAX_GROWTH)
    measured = headroom.size_rehearsal * ratio ** (1.0 / headroom.growth) if headroom.growth > 0 else math.inf
    return earliest, max(measured, earliest)


def check_projected_headroom(
    headroom: Headroom,
    thresholds: Thresholds,
    measured: tuple[int, int, int, int] | None = None,
    not_measured: str = "",
    examples_full: int | None = None,
) -> CheckOutcome:
    """`<stage>.projected_headroom`: where the full run lands against the dtype's max.

    A projection is a hypothesis: past the max it is a `fail` only once measured, and then the finding is
    the measurement's, `<stage>.full_size_overflow` — `measured` is
    (non-finite entries, entries, examples accumulated, all examples) of the stage accumulated over the
    data in the configured dtype, stopped at the first non-finite sum; finite there, the projection was
    wrong (`info`). Not measured (`not_measured` says why), it is a `warn` giving the size at which the
    sum is projected to cross. Within `headroom_warn_fraction` of the max: a `warn`.
    """
    outcome = CheckOutcome(metrics={"projected_headroom": headroom.to_dict()})
    share = headroom.share_projected
    if share <= thresholds.covariance.headroom_warn_fraction or headroom.size_full <= headroom.size_rehearsal:
        return outcome
    prefix = "scores" if headroom.stage.endswith("_scores") else headroom.stage
    growth = (
        f"The largest |entry| grows as size^{headroom.growth:.2f} ({fmt(headroom.max_probe)} at "
        f"{headroom.size_probe:.0f}, {fmt(headroom.max_rehearsal)} at {headroom.size_rehearsal:.0f}): "
        f"at the full {headroom.size_full:.0f} it reaches {fmt(headroom.max_projected)}"
    )
    check = f"{prefix}.projected_headroom"
    if share <= 1.0:
        outcome.findings.append(
            warn(
                check,
                f"{growth}, {share:.0%} of {headroom.dtype}'s range.",
                subject=headroom.subject,
                value=headroom.max_projected,
                limit=thresholds.covariance.headroom_warn_fraction * headroom.dtype_max,
                stage=headroom.stage,
            )
        )
        return outcome
    if measured is not None:
        nonfinite, entries, examples, total = measured
        outcome.metrics["measured_at_full_size"] = {
            "nonfinite": nonfinite,
            "entries": entries,
            "examples": examples,
            "total_examples": total,
        }
        where = f"after {examples} of the {total} examples (the pass stopped there)" if examples < total else ""
        outcome.findings.append(
            finding(
                "fail" if nonfinite else "info",
                f"{prefix}.full_size_overflow",  # a measurement, named as one
                f"{growth}, past {headroom.dtype}'s maximum {fmt(headroom.dtype_max)}; measured: "
                f"accumulated in {headroom.dtype} over the training data in order, "
                + (
                    f"{nonfinite} of {entries} entries are inf/NaN {where or f'over all {total} examples'}: "
                    "the full run overflows."
                    if nonfinite
                    else f"every entry is finite over all {total} examples: the projection overestimated."
                ),
                subject=headroom.subject,
                value=float(nonfinite),
                limit=0.0,
                cause=FP16_OVERFLOW if nonfinite else None,
                stage=headroom.stage,
            )
        )
        return outcome
    earliest, latest = crossing(headroom)
    where = _crossing_text(earliest, latest, headroom.size_full, examples_full)
    outcome.findings.append(
        warn(
            check,
            f"{growth}, past {headroom.dtype}'s maximum {fmt(headroom.dtype_max)}: projected to overflow "
            f"{where}. Not measured{': ' + not_measured if not_measured else ''}.",
            subject=headroom.subject,
            value=headroom.max_projected,
            limit=headroom.dtype_max,
            cause=FP16_OVERFLOW,
            stage=headroom.stage,
        )
    )
    return outcome


def _crossing_text(earliest: float, latest: float, size_full: float, examples_full: int | None) -> str:
    """'between 2,100 and 3,400 examples' (or sizes, when the examples are not known)."""
    if examples_full and size_full > 0:
        low, high = earliest / size_full * examples_full, latest / size_full * examples_full
        unit = "examples"
    else:
        low, high, unit = earliest, latest, "terms"
    if not math.isfinite(high) or high <= low * 1.05:
        return f"at about {low:,.0f} {unit}"
    return f"between {low:,.0f} and {high:,.0f} {unit}"


def accumulated_maxima(artifacts: dict[str, Any], stage: str) -> dict[str, tuple[float, float, float]]:
    """subject → (terms summed or pairs maximised over, largest finite |value|, the stored dtype's max) for
    what `stage` accumulates; subjects holding inf/NaN are left out (their overflow is already measured)."""
    artifact = artifacts.get(stage) or {}
    out: dict[str, tuple[float, float, float]] = {}
    if stage in ("covariance", "lambda"):
        factors = (
            (
                ("activation_covariance", "num_activation_covariance_processed"),
                ("gradient_covariance", "num_gradient_covariance_processed"),
            )
            if stage == "covariance"
            else (("lambda_matrix", "num_lambda_processed"),)
        )
        for factor, counts in factors:
            for module, tensor in (artifact.get(factor) or {}).items():
                if bool(torch.isfinite(tensor).all()):
                    size = float(artifact[counts][module].sum())
                    out[f"{module}/{factor}"] = (size, max_abs_finite(tensor), max_value(tensor.dtype))
    elif artifact:
        scores = total_scores(artifact)
        if scores.numel() and bool(torch.isfinite(scores).all()):
            out[SCORE_SUBJECTS[stage]] = (float(scores.numel()), max_abs_finite(scores), max_value(scores.dtype))
    return out
