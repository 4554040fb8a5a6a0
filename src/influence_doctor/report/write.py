"""Writing a finished (or stopped) diagnosis: the verdict, the document, and its files.

The status is `sick` when a problem is left, a stage is broken, or the fix costs more fidelity than the bar
allows; `healed` when a rung changed the run and nothing is left; `healthy` otherwise. Rank 0 alone writes,
atomically: report.json, scores.safetensors (the final scores, for the gates), report.md and report.html.
"""

from __future__ import annotations

from typing import Any

from influence_doctor import distributed
from influence_doctor.atomic import write_tensors_atomic, write_text_atomic
from influence_doctor.checks.scores import total_scores
from influence_doctor.fidelity import snapshot
from influence_doctor.projection import project
from influence_doctor.report.document import SCORE_STAGES, SCORES_FILE, build_report
from influence_doctor.report.html import render_html
from influence_doctor.report.prescription import advice_for, prescription_for
from influence_doctor.report.strict_json import dumps, strict
from influence_doctor.report.text import render


def write_report(
    run: Any, target: str | None, treatment: Any, examiner: Any, synchronise: bool = True
) -> tuple[str, dict[str, Any]]:
    """The run's verdict and report document; rank 0 writes its files (every rank gets rank 0's verdict).
    `synchronise=False` for a stopped run, whose other ranks may not be here: no collectives."""
    examiner.examine(treatment.probes, treatment.fix, merge=synchronise)
    problems = treatment.problems if treatment.problems is not None else []
    broken = any(record.status in ("error", "fail", "interrupted") for record in run.stages.values())
    costly = treatment.fix is not None and bool(treatment.fix.get("below_limit"))
    if problems or broken or costly:
        status = "sick"
    elif treatment.applied:
        status = "healed"
    else:
        status = "healthy"
    if synchronise:
        status = distributed.decide(status)
    prescription: dict[str, Any] = {}
    fidelity: dict[str, Any] = {"probes": run.probes}
    if float64 := _final_float64_agreement(run.probes):
        fidelity["float64"] = float64
    if treatment.probes is not None and treatment.probes.hooks is not None:
        fidelity["hooks"] = treatment.probes.hooks.summary()
    if examiner.seed is not None:
        fidelity["seed"] = examiner.seed.summary()
    if treatment.applied or run.configuration != run.asked:  # a rung, or the coverage the run went on with
        prescription = prescription_for(run.asked, run.configuration)
        if treatment.fix is not None:
            fidelity["fix"] = treatment.fix
        if treatment.exact is not None:
            fidelity["exact"] = treatment.exact
    result = treatment.result
    if result is not None and (advice := advice_for(run.asked, result.advice, treatment.min_fix_spearman)):
        prescription["advice"] = advice
    rehearsal = run.options.examples is not None and len(run.train_indices) < run.train_examples_total
    document = strict(
        build_report(
            run,
            status,
            target,
            problems,
            initial_problems=treatment.initial_problems + (result.revealed if result else []),
            remedies=[remedy.to_dict() for remedy in treatment.remedies],
            prescription=prescription,
            fidelity=fidelity,
            projection=project(run, treatment.labs, run.options.memory_budget) if rehearsal else {},
        )
    )
    if (world := distributed.current()).distributed:
        document["environment"]["distributed"] = _distributed_summary(run)
    if world.is_writer:
        write_text_atomic(run.run_dir / "report.json", dumps(document, already_strict=True))
        write_final_scores(run)
        write_text_atomic(run.run_dir / "report.md", render(document, markdown=True))
        snapshots = result.snapshots if result is not None else _as_configured(run)
        page = render_html(document, snapshots, _probe_scores(treatment.labs, run), run.exact_pairwise)
        write_text_atomic(run.run_dir / "report.html", page)
    return status, document


def write_final_scores(run: Any) -> None:
    """The final configuration's scores (summed over modules) as scores.safetensors beside the report."""
    tensors = {
        kind: total_scores(run.artifacts[stage]).detach().cpu().contiguous()
        for kind, stage in SCORE_STAGES.items()
        if run.artifacts.get(stage) and run.stages[stage].completed
    }
    if tensors:
        write_tensors_atomic(run.run_dir / SCORES_FILE, tensors)


def _as_configured(run: Any) -> list[Any]:
    """The run as configured, for the figures of a run no remedy touched (nothing, for a run stopped early)."""
    try:
        return [snapshot(run, "as configured")]
    except Exception:  # a run stopped early has nothing to compare; the figures say so
        return []


def _final_float64_agreement(probes: dict[str, Any]) -> dict[str, Any]:
    """How the final configuration's scores compare with float64 at the same damping, on the probe:
    the fidelity of a fix that changed only precision, which no less-regularized run can measure."""
    precision = (probes.get("final") or probes).get("precision") or {}
    return {
        kind: {key: precision[kind][key] for key in ("median_spearman", "worst_spearman", "top_overlap")}
        for kind in ("pairwise", "self")
        if isinstance(precision.get(kind), dict)
    }


def _probe_scores(labs: Any, run: Any) -> dict[str, tuple[Any, Any]] | None:
    """(configured, float64) scores on the probe, already computed by the precision probe: the fidelity
    figure of a run no remedy touched."""
    if labs is None or not labs.enabled or labs.probe is None:
        return None
    from influence_doctor.labs import float64

    configured = labs.probe.measured(run.configuration)
    reference = labs.probe.measured(float64(run.configuration))
    if configured is None or reference is None:
        return None
    return {kind: (configured.scores(kind), reference.scores(kind)) for kind in ("pairwise", "self")}


def _distributed_summary(run: Any) -> dict[str, Any]:
    """How the ranks shared the work, and whether they measured the same numbers in every stage."""
    disagreeing = sorted(
        name for name, record in run.stages.items() if not (record.metrics.get("ranks") or {}).get("agree", True)
    )
    return {
        "kronfluence_distributes": distributed.kronfluence_distributes(),
        "ranks_agree": not disagreeing,
        "stages_where_ranks_disagree": disagreeing,
    }
