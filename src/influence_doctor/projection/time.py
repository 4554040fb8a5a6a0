"""Stage time at full size, fitted from what was measured, in the unit kronfluence works in: batches.

Each stage costs a fixed part (loading factors, building loaders, saving) plus a part per batch it
processes: covariance, Λ and self scores one pass over the training batches, pairwise scores one per
query batch, the eigendecomposition one eigh per factor whatever the data size.

The per-batch part is read, where it can be, from the intervals between the batches of the rehearsal
itself (`from_batch_stamps`: the median time from one batch entering the model to the next), and the
fixed part is the rest of the stage's measured time. Where a stage has too few batches for that (or
does not call the model), two or more measured sizes (the pilots and the rehearsal) fit both parts by
least squares (`fit`); at small sizes their difference is mostly noise, which is why it comes second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def batches(stage: str, examples: int, queries: int, batch_size: int, query_batch_size: int) -> float:
    """The work unit of `stage`: the batches it iterates over (1 for the eigendecomposition)."""
    if stage == "eigendecomposition":
        return 1.0
    train = math.ceil(examples / max(batch_size, 1))
    if stage == "pairwise_scores":
        return float(train * math.ceil(queries / max(query_batch_size, 1)))
    return float(train)


@dataclass(frozen=True)
class TimeModel:
    """seconds = fixed + per_batch · batches."""

    fixed: float
    per_batch: float

    def seconds(self, work: float) -> float:
        return self.fixed + self.per_batch * work


MIN_TIMED_BATCHES = 3
"""Fewest batches whose intervals time a stage: two intervals or more, so one slow batch is not the median."""


def from_batch_stamps(stamps: list[float], work: float, seconds: float | None) -> TimeModel | None:
    """The stage's model from when each batch entered the model (`stamps`), its `work` in batches and
    its measured `seconds`; None when there are too few batches to time.

    A batch may call the model k times (k = forwards / batches, rounded); one batch's cost is then the
    median span of k consecutive forwards. The fixed part is what the measured total leaves over."""
    if seconds is None or not math.isfinite(seconds) or work < MIN_TIMED_BATCHES or len(stamps) < MIN_TIMED_BATCHES:
        return None
    per = max(1, round(len(stamps) / work))
    spans = sorted(later - earlier for earlier, later in zip(stamps, stamps[per:], strict=False))
    if len(spans) < MIN_TIMED_BATCHES - 1:
        return None
    middle = len(spans) // 2
    per_batch = spans[middle] if len(spans) % 2 else 0.5 * (spans[middle - 1] + spans[middle])
    return TimeModel(max(seconds - per_batch * work, 0.0), max(per_batch, 0.0))


def fit(points: list[tuple[float, float]]) -> TimeModel | None:
    """Least squares over (batches, seconds) with both parts non-negative; None without a point."""
    points = [(w, s) for w, s in points if w > 0 and s is not None and math.isfinite(s) and s >= 0]
    if not points:
        return None
    works = {w for w, _ in points}
    if len(works) == 1:
        work = works.pop()
        return TimeModel(0.0, sum(s for _, s in points) / len(points) / work)
    n = len(points)
    mean_w = sum(w for w, _ in points) / n
    mean_s = sum(s for _, s in points) / n
    slope = sum((w - mean_w) * (s - mean_s) for w, s in points) / sum((w - mean_w) ** 2 for w, _ in points)
    if slope <= 0:  # noise: time did not grow with the batches measured
        return TimeModel(mean_s, 0.0)
    fixed = mean_s - slope * mean_w
    if fixed < 0:  # through the origin instead
        return TimeModel(0.0, sum(w * s for w, s in points) / sum(w * w for w, _ in points))
    return TimeModel(fixed, slope)
