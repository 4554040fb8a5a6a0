"""How many examples the rehearsal gets: what fits in a share of the full run's projected time.

Two small pilots (the probe subsample and one about twice its size, from the same seeded permutation)
are timed stage by stage; per-batch time models fitted on them project the full run, and the rehearsal
takes the largest prefix of the permutation whose own projected time stays within `REHEARSAL_SHARE` of
it — never fewer than `MIN_REHEARSAL` examples, which the headroom growth and the statistics of the
checks need, and never more than there are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from influence_doctor.projection.time import TimeModel, batches

REHEARSAL_SHARE = 0.1
"""The rehearsal's time budget: a tenth of the projected full run."""
MIN_REHEARSAL = 256
"""Fewest examples rehearsed: four times the 64-example probe, so the growth of accumulated sums is
measured over a factor of four, and several batches for every statistic the checks take."""


@dataclass(frozen=True)
class RehearsalPlan:
    examples: int
    full_seconds: float  # the full run's kronfluence stages, projected from the pilots
    rehearsal_seconds: float  # the chosen rehearsal's, projected the same way
    budget_seconds: float
    reason: str
    pilot_points: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # stage → (batches, s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "projected_full_seconds": self.full_seconds,
            "projected_rehearsal_seconds": self.rehearsal_seconds,
            "budget_seconds": self.budget_seconds,
            "chosen_by": self.reason,
            "pilot_stage_seconds": {stage: [list(point) for point in pts] for stage, pts in self.pilot_points.items()},
        }


def stage_seconds(
    models: dict[str, TimeModel], examples: int, queries: int, batch_size: int, query_batch_size: int
) -> float:
    return sum(
        model.seconds(batches(stage, examples, queries, batch_size, query_batch_size))
        for stage, model in models.items()
    )


def plan_rehearsal(
    models: dict[str, TimeModel],
    total: int,
    queries: tuple[int, int],
    batch_size: int,
    query_batch_size: int,
    share: float = REHEARSAL_SHARE,
    minimum: int = MIN_REHEARSAL,
    overhead_seconds: float = 0.0,
) -> RehearsalPlan:
    """The largest rehearsal within `share` of the projected full run, clamped to [minimum, total].

    `queries` = (the rehearsal's, the full run's): the pairwise stage's cost grows with both.
    `overhead_seconds` is what the doctor spends besides the rehearsal's stages (pilots, probes): the
    share is of the whole, so it comes off the stages' budget."""
    rehearsed_queries, all_queries = queries
    full = stage_seconds(models, total, all_queries, batch_size, query_batch_size)
    budget = max(share * full - overhead_seconds, 0.0)
    low, high = 1, total
    while low < high:  # the projected time grows with the examples: bisect for the largest that fits
        middle = (low + high + 1) // 2
        if stage_seconds(models, middle, rehearsed_queries, batch_size, query_batch_size) <= budget:
            low = middle
        else:
            high = middle - 1
    examples = min(max(low, minimum), total)
    if examples == total:
        reason = "the whole training set fits the time budget" if low >= total else "the minimum covers every example"
    elif examples == minimum and low < minimum:
        reason = f"the minimum of {minimum} examples (the time budget alone would allow {low})"
    else:
        reason = f"{share:.0%} of the projected full run"
    rehearsal = stage_seconds(models, examples, rehearsed_queries, batch_size, query_batch_size)
    return RehearsalPlan(examples, full, rehearsal, budget, reason)


DEFAULT_PROBE_EXAMPLES = 64
"""Size of the pilot that times the stages when the probes themselves are off."""


def size_rehearsal(run: Any, note: Any, spent_seconds: float) -> Any:
    """Size the run's rehearsal by a share of the projected full run (timed on two pilots) and record the
    plan; returns the probe pilot's Lab so its trials serve the probes too. `spent_seconds` (imports,
    building and training the model) is paid by the rehearsal and the full run alike."""
    from influence_doctor.labs import PROBE_QUERIES

    note("timing two small pilots to size the rehearsal")
    probe_examples = run.options.probe_examples or DEFAULT_PROBE_EXAMPLES
    plan, probe = choose_rehearsal(run, probe_examples, PROBE_QUERIES, spent_seconds=spent_seconds)
    run.rehearsal_plan = plan.to_dict()
    note(f"rehearsing on {plan.examples} of {run.train_examples_total} examples: {plan.reason}")
    return probe


def choose_rehearsal(
    run: Any, probe_examples: int, probe_queries: int, spent_seconds: float = 0.0
) -> tuple[RehearsalPlan, Any]:
    """Time two pilots on prefixes of the run's permuted training data, fit per-batch models, and shrink
    the rehearsal to the plan's size. Returns the plan and the smaller pilot's Lab, which is the probe
    subsample itself (its trials are reused, not repeated).

    `spent_seconds` is what both runs pay before any kronfluence stage (imports, building and training
    the model): for the rehearsal's whole wall time to stay within the share of the full run's, the
    rehearsal's own work gets share·F − (1 − share)·spent."""
    from influence_doctor.distributed import decide
    from influence_doctor.labs import Lab
    from influence_doctor.projection.time import fit

    total, batch = len(run.train_subset), run.train_batch_size
    queries = (len(run.query_subset), run.query_examples_total)
    if total <= MIN_REHEARSAL:
        run.session.resize_rehearsal(total)
        return RehearsalPlan(total, 0.0, 0.0, 0.0, f"{total} examples: no more than the minimum"), None
    small = Lab.at(run, "probe", max(probe_examples, 1), probe_queries)
    large = Lab.at(run, "pilot", max(2 * small.examples, 2 * batch), probe_queries)
    # The first call of every kronfluence stage pays one-off costs (threads, kernels, allocations) that
    # would pass for per-batch time: one throwaway batch through every stage first.
    warmup = Lab.at(run, "warmup", min(batch, small.examples), probe_queries)
    warmup.configured()
    points: dict[str, list[tuple[float, float]]] = {}
    for lab in (small, large):
        trial = lab.configured()
        for stage, seconds in trial.stage_seconds.items():
            work = batches(stage, lab.examples, lab.queries, batch, run.pipeline.query_batch_size)
            points.setdefault(stage, []).append((work, seconds))
    models = {stage: model for stage, pairs in points.items() if (model := fit(pairs)) is not None}
    overhead = warmup.seconds + small.seconds + large.seconds + (1 - REHEARSAL_SHARE) * spent_seconds
    plan = plan_rehearsal(models, total, queries, batch, run.pipeline.query_batch_size, overhead_seconds=overhead)
    if plan.examples < total:  # the pilot will be the probe: its probes' cost comes off the budget too
        overhead += _probe_seconds(run, small)
        plan = plan_rehearsal(models, total, queries, batch, run.pipeline.query_batch_size, overhead_seconds=overhead)
    plan = dataclasses.replace(plan, pilot_points=points)  # the time projection fits them with the rehearsal
    plan = decide(plan)  # under torchrun the clocks differ: rank 0's plan for every rank
    run.session.resize_rehearsal(plan.examples)
    # Everything rehearsed is the data in its own order, whose first examples are not the pilot's.
    return plan, (small if plan.examples < total else None)


def _probe_seconds(run: Any, probe: Any) -> float:
    """What the probes will cost, measured rather than guessed: the float64 re-run of the probe is run
    now (the precision probe reuses it, cached) and timed; the damping ×10 probe scores the kind a user
    reads (pairwise, else self) once more per distinct module damping — one pass for an explicit
    damping, one per module for kronfluence's heuristic, which differs from module to module."""
    from influence_doctor.checks.spectra import module_damping

    if not run.options.probe_examples:
        return 0.0
    before = probe.seconds
    try:
        probe.reference()
    except Exception:  # the probe reports its own failure later; sizing goes on without it
        return probe.seconds - before
    configured = probe.configured()
    stage = "pairwise_scores" if "pairwise" in run.pipeline.scores else "self_scores"
    damping = module_damping(configured.artifacts, run.factor_args.strategy, run.score_args.damping_factor)
    passes = max(len(set(damping.values())), 1)
    return probe.seconds - before + passes * configured.stage_seconds.get(stage, 0.0)
