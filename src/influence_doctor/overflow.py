"""A projected overflow becomes a measurement: kronfluence's covariance stage run over all the data.

The rehearsal sees a subsample, and a float16 sum that fits on it can pass 65504 on the full data set.
The growth it measured between two sizes predicts where; a prediction is a hypothesis, not a wrong
number. When the projection says a covariance sum overflows at full size and one covariance pass over
all the data fits the budget, that one stage is run for real, in the configured dtype, and the
non-finite entries it holds are what the verdict rests on. The pass goes through the data in
consecutive slices, adding each slice's sums to the running sums in the configured dtype (as the
stage itself accumulates batch after batch), and stops at the first slice after which a sum is
non-finite: an overflow is found as early as it happens, and its place in the data is reported.
Experiments and rungs that test the same symptom (a dtype raised) are measured the same way, at full
size, cached per configuration.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from influence_doctor.environment import seed_everything
from influence_doctor.lab import settings_key
from influence_doctor.pipeline import STAGES
from influence_doctor.runner import calls

COVARIANCE_FACTORS = ("activation_covariance", "gradient_covariance")
SLICES = 8
"""Consecutive slices of the data the full-size pass accumulates (each at least one batch): the running
sums are checked after each, so an overflow stops the pass within an eighth of the data of where it
happened, for one kronfluence call per slice."""


@dataclass(frozen=True)
class FullSizeCount:
    """What one covariance pass over the training data held, per `module/factor` subject: over all of it,
    or up to the slice after which a sum was first non-finite (`examples` of `total_examples`)."""

    examples: int
    nonfinite: dict[str, int]
    entries: dict[str, int]
    seconds: float
    error: str | None = None  # the stage raised instead
    total_examples: int = 0

    @property
    def stopped_early(self) -> bool:
        return self.examples < self.total_examples

    def total(self, subjects: Any = None) -> int:
        keys = self.nonfinite if subjects is None else [s for s in subjects if s in self.nonfinite]
        return sum(self.nonfinite[s] for s in keys)


@dataclass
class FullSizeCovariance:
    """Runs kronfluence's covariance stage over the run's whole training set, once per configuration."""

    run: Any
    counts: dict[str, FullSizeCount] = field(default_factory=dict)

    @property
    def examples(self) -> int:
        return self.run.train_examples_total

    def measure(self, factor_args: Any) -> FullSizeCount:
        key = settings_key(factor_args, summed_task=self.run.summed_task)
        if key not in self.counts:
            self.counts[key] = self._accumulate(factor_args, f"full-covariance-{len(self.counts) + 1}")
        return self.counts[key]

    def _accumulate(self, factor_args: Any, name: str) -> FullSizeCount:
        from torch.utils.data import Subset

        run = self.run
        dataset = run.train_subset.dataset  # every training example, in the data set's own order
        total = len(dataset)
        width = max(run.train_batch_size, math.ceil(total / SLICES))
        seed_everything(run.seed + STAGES.index("covariance"))
        started = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        seen = 0
        for index, start in enumerate(range(0, total, width)):
            part = Subset(dataset, range(start, min(total, start + width)))
            try:
                with calls.task_in_force(run.analyzer, run.task):
                    calls.fit_covariance(run.analyzer, f"{name}-{index + 1}", part, run.train_batch_size, factor_args)
                artifact = calls.load(run.analyzer, "covariance", f"{name}-{index + 1}")
            except Exception as exc:  # an allocator or kronfluence failure: the measurement did not happen
                text = str(exc).strip().splitlines()
                error = f"{type(exc).__name__}: {text[0] if text else ''}"
                return FullSizeCount(seen, {}, {}, time.perf_counter() - started, error, total)
            for factor in COVARIANCE_FACTORS:
                for module, tensor in (artifact.get(factor) or {}).items():
                    subject = f"{module}/{factor}"
                    sums[subject] = tensor.clone() if subject not in sums else sums[subject].add_(tensor)
            seen += len(part)
            if any(not bool(torch.isfinite(tensor).all()) for tensor in sums.values()):
                break
        nonfinite = {subject: int((~torch.isfinite(tensor)).sum()) for subject, tensor in sums.items()}
        entries = {subject: tensor.numel() for subject, tensor in sums.items()}
        return FullSizeCount(seen, nonfinite, entries, time.perf_counter() - started, None, total)


def affordable(run: Any, share: float, floor_seconds: float) -> tuple[bool, float, float]:
    """(whether one covariance pass over all the data fits the budget, its projected seconds, the budget):
    the covariance stage's rehearsal seconds scaled to the full size, against `share` of the whole
    rehearsal's stages scaled alike (at least `floor_seconds`)."""
    rehearsed, total = max(len(run.train_indices), 1), run.train_examples_total
    scale = total / rehearsed
    covariance = (run.stages["covariance"].seconds or 0.0) * scale
    stages = sum((record.seconds or 0.0) for name, record in run.stages.items() if name != "train") * scale
    budget = max(floor_seconds, share * stages)
    return covariance <= budget, covariance, budget
