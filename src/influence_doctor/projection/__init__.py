"""What the full run will cost and where it will break, projected from the rehearsal (SPEC section 6).

- `factors`: the bytes of the stored factors, exact from shapes and dtypes;
- `memory`: each stage's peak at full size, from its measured peak, and the smallest setting that fits;
- `time`: each stage's seconds at full size, per batch from the rehearsal's own batches (else fitted
  on the measured sizes);
- headroom of accumulated quantities comes from `checks.headroom` (measured growth, via the probes).
"""

from __future__ import annotations

from typing import Any

from influence_doctor.projection.factors import factor_bytes
from influence_doctor.projection.memory import advise, module_shapes, project_stage
from influence_doctor.projection.time import batches, fit, from_batch_stamps
from influence_doctor.runner.memory import device_memory_bytes

PROJECTED_STAGES = ("covariance", "eigendecomposition", "lambda", "pairwise_scores", "self_scores")


def project(run: Any, labs: Any = None, budget: float | None = None) -> dict[str, Any]:
    """The report's `projection` block: full sizes, per-stage peak bytes and seconds, headroom, advice.

    `budget` is the memory a stage may use (bytes); by default the device's memory (GPU, else host RAM).
    """
    examples, queries = len(run.train_indices), len(run.query_indices)
    examples_full = max(run.train_examples_total, examples)
    queries_full = max(run.query_examples_total, queries)
    budget = budget if budget is not None else device_memory_bytes(run.device)
    shapes = module_shapes(run.artifacts, examples)
    settings = run.configuration
    sizes = (queries, examples, queries_full, examples_full)
    probe = labs.probe.configured() if labs is not None and labs.probe is not None else None
    stages: dict[str, Any] = {}
    advice: list[dict[str, Any]] = []
    for stage in PROJECTED_STAGES:
        record = run.stages[stage]
        if not record.completed:
            continue
        entry: dict[str, Any] = {}
        measured = record.metrics.get("memory") or {}
        if measured.get("peak_bytes") is not None:
            peak = project_stage(stage, measured, shapes, settings, settings, sizes)
            entry.update(peak_bytes=peak, rehearsal_peak_bytes=measured["peak_bytes"], memory=measured["kind"])
            if budget is not None:
                entry["fits"] = peak <= budget
                if peak > budget:
                    advice.append(advise(stage, measured, shapes, settings, sizes, budget, run.device))
        points = [(_work(stage, run, examples, queries), record.seconds)]
        pilots = (getattr(run, "rehearsal_plan", None) or {}).get("pilot_stage_seconds", {}).get(stage)
        if pilots:  # both pilots (the probe is the smaller): three sizes fit the fixed and per-batch parts
            points += [(work, seconds) for work, seconds in pilots]
        elif probe is not None and stage in probe.stage_seconds:
            points.append((_work(stage, run, labs.probe.examples, labs.probe.queries), probe.stage_seconds[stage]))
        model = from_batch_stamps(record.forward_stamps, points[0][0], record.seconds)
        timed_by = "batch intervals"
        if model is None:
            model, timed_by = fit(points), "sizes"
        if model is not None:
            entry.update(
                seconds=model.seconds(_work(stage, run, examples_full, queries_full)),
                rehearsal_seconds=record.seconds,
                model={"fixed_seconds": model.fixed, "seconds_per_batch": model.per_batch, "from": timed_by},
            )
        stages[stage] = entry
    memory = factor_bytes(run)
    return {
        "examples_full": examples_full,
        "queries_full": queries_full,
        "examples_rehearsal": examples,
        "queries_rehearsal": queries,
        "stages": stages,
        "seconds": sum(entry.get("seconds", 0.0) for entry in stages.values()),
        "factor_bytes": memory,
        "memory_budget_bytes": budget,
        "headroom": [headroom.to_dict() for headroom in getattr(run, "headroom", {}).values()],
        "advice": advice,
    }


def _work(stage: str, run: Any, examples: int, queries: int) -> float:
    return batches(stage, examples, queries, run.train_batch_size, run.pipeline.query_batch_size)
