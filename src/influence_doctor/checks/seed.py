"""The rankings against a second sampling seed, judged (the measurement is `audit/seed.py`).

Below `seed_min_spearman` (projected to the full run where the rehearsal is smaller) the user's rankings
are one draw among many: `fisher-sampling-noise`, a `warn` with the options measured. Never a `fail`: the
numbers are finite and correct for their seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from influence_doctor.causes import FISHER_SAMPLING_NOISE
from influence_doctor.checks.outcome import CheckOutcome
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.findings import info, warn


@dataclass
class SeedAgreement:
    """The rankings of two sampling seeds, as measured and as projected (measured by `audit/seed.py`)."""

    kind: str = "pairwise"
    examples: int = 0  # the examples the factors saw where it was measured (the rehearsal's)
    median_spearman: float = math.nan
    worst_spearman: float = math.nan
    top_overlap: float = math.nan
    trend: list[tuple[int, float]] = field(default_factory=list)  # (factor examples, median Spearman on the probe)
    exponent: float | None = None  # α of 1 − ρ ∝ n^−α, from the trend
    projected_examples: int = 0  # the full run's examples
    projected_median: float | None = None  # the median Spearman projected to the full run
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    lower_bound: bool = False  # measured on the probe alone, already at the bar: the run's own agree at least as well
    skipped: str = ""
    seconds: float = 0.0

    @property
    def judged(self) -> float:
        """The agreement the bar is held to: the projection to the full run where there is one."""
        return self.projected_median if self.projected_median is not None else self.median_spearman

    def summary(self) -> dict[str, Any]:
        """report.json's fidelity.seed."""
        if self.skipped:
            return {"skipped": self.skipped, "seconds": self.seconds}
        summary: dict[str, Any] = {
            "kind": self.kind,
            "median_spearman": self.median_spearman,
            "worst_spearman": self.worst_spearman,
            "top_overlap": self.top_overlap,
            "examples": self.examples,
            "trend": [{"examples": n, "median_spearman": rho} for n, rho in self.trend],
            "seconds": self.seconds,
        }
        if self.lower_bound:
            summary["lower_bound"] = True
        if self.exponent is not None:
            summary["exponent"] = self.exponent
        if self.projected_median is not None:
            summary["projected"] = {"examples": self.projected_examples, "median_spearman": self.projected_median}
        if self.options:
            summary["options"] = self.options
        return summary


def check_seed(seed: Any, stage: str, thresholds: Thresholds) -> CheckOutcome:
    """`scores.sampling_seed`: warn below the bar, info above it (nothing when it was not measured)."""
    outcome = CheckOutcome()
    if seed is None or seed.skipped or math.isnan(seed.judged):
        return outcome
    bar = thresholds.precision.seed_min_spearman
    text = (
        f"Two sampling seeds of the true Fisher's targets rank the examples alike at a median per-query Spearman of "
        f"{seed.median_spearman:.3f} (worst {seed.worst_spearman:.3f}, top-10 overlap {seed.top_overlap:.2f}) with "
        f"factors fitted on {seed.examples:,} examples"
    )
    if seed.projected_median is not None:
        trend = " → ".join(f"{rho:.3f} at {n:,}" for n, rho in seed.trend)
        text += (
            f"; projected to {seed.projected_median:.3f} at the full run's {seed.projected_examples:,} examples "
            f"along the measured trend ({trend} on the probe's examples)"
        )
    outcome.metrics = seed.summary()
    if seed.lower_bound:
        text += ", the probe's; more examples only lower the noise, so the run's factors agree at least as well"
    if seed.judged >= bar:
        outcome.findings.append(info("scores.sampling_seed", text + ".", stage=stage, value=seed.judged, limit=bar))
        return outcome
    text += f", below {bar:g}: the rankings are one draw among many. " + _options(seed, bar)
    outcome.findings.append(
        warn("scores.sampling_seed", text, stage=stage, value=seed.judged, limit=bar, cause=FISHER_SAMPLING_NOISE)
    )
    return outcome


def _options(seed: Any, bar: float) -> str:
    """The options measured, in one sentence each."""
    parts = []
    empirical = seed.options.get("empirical_fisher")
    if empirical:
        parts.append(
            "use_empirical_fisher=True is deterministic (seeds agree at 1.000) but a different quantity: on the probe "
            f"it ranks like the true Fisher at {empirical['against_true_fisher']:.3f}"
        )
    heuristic = seed.options.get("damping_heuristic")
    if heuristic:
        parts.append(
            f"damping_factor=None (kronfluence's heuristic, a modeling choice) makes two seeds agree at "
            f"{heuristic['seed_median_spearman']:.3f} on {heuristic['examples']} examples"
        )
    more = seed.options.get("more_examples")
    if more and more.get("examples_for_bar"):
        parts.append(f"about {more['examples_for_bar']:,} examples for the factors would reach {bar:g}, by the trend")
    return ("Options, measured: " + "; ".join(parts) + ".") if parts else ""
