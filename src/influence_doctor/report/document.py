"""The report.json document (SPEC section 6): fixed top-level keys, built from a finished Run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from influence_doctor.checks.scores import tokens_of, total_scores
from influence_doctor.diagnosis import Problem, relabel
from influence_doctor.environment import describe_environment
from influence_doctor.pipeline import STAGES
from influence_doctor.report.scores import summarize_scores
from influence_doctor.runner.run import Run
from influence_doctor.version import __version__

SCHEMA_VERSION = 1
TOP_LEVEL_KEYS: tuple[str, ...] = (
    "schema_version",
    "tool",
    "pipeline",
    "status",
    "environment",
    "config",
    "stages",
    "remedies",
    "prescription",
    "scores",
    "fidelity",
    "projection",
    "gates",
)
SCORE_STAGES: dict[str, str] = {"pairwise": "pairwise_scores", "self": "self_scores"}
SCORES_FILE = "scores.safetensors"
"""The final scores, beside report.json, so gates can rank them against a baseline's."""


def build_report(
    run: Run,
    status: str,
    target: str | None = None,
    problems: list[Problem] | None = None,
    *,
    initial_problems: list[Problem] | None = None,
    remedies: list[dict[str, Any]] | None = None,
    prescription: dict[str, Any] | None = None,
    fidelity: dict[str, Any] | None = None,
    projection: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a person or a CI gate needs to judge and reproduce the run, as plain JSON types.

    Each stage lists the problems rooted in it; each finding's `cause` is the root cause the
    diagnosis traced it to (an eigh failure on an overflowed fp16 covariance reads `fp16-overflow`).
    """
    problems = problems or []
    document: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "influence-doctor", "version": __version__},
        "pipeline": {
            "name": run.pipeline.name,
            "target": target,
            "run_id": run.run_dir.name,
            "run_dir": _relative(run.run_dir, run.options.out_dir),
            "analysis_dir": _relative(run.analysis_dir, run.options.out_dir),
            "rehearsal": {
                "examples": len(run.train_indices),
                "examples_total": run.train_examples_total,
                "queries": len(run.query_indices),
                "full": run.options.examples is None,
                "plan": run.rehearsal_plan or None,
            },
            "partial": run.interrupted_in is not None,
            "interrupted_in": run.interrupted_in,
            "diagnosis": [p.to_dict() for p in initial_problems or problems],
            "timing": _timing(run),
        },
        "status": status,
        "environment": describe_environment(run.device, run.seed),
        "config": {
            "factor_args": run.pipeline.factor_args.to_dict(),
            "score_args": run.pipeline.score_args.to_dict(),
            "final_factor_args": run.factor_args.to_dict(),
            "final_score_args": run.score_args.to_dict(),
            "scores": list(run.pipeline.scores),
            "batch_size": run.pipeline.batch_size,
            "query_batch_size": run.pipeline.query_batch_size,
            "seed": run.seed,
            "examples": run.options.examples,
            "queries": run.options.queries,
            "device": run.device,
            "fix": run.options.fix,
            "probe_examples": run.options.probe_examples,
        },
        "stages": [_stage_entry(run, name, problems) for name in STAGES],
        "remedies": remedies or [],
        "prescription": prescription or {},
        "scores": _scores_block(run),
        "fidelity": fidelity if fidelity is not None else {"probes": run.probes},
        "projection": projection or {},
        "gates": [],
    }
    assert tuple(document) == TOP_LEVEL_KEYS
    return document


def _relative(path: Path, reports_dir: Path) -> str:
    """A path as seen from the reports directory, so a committed report names no machine's folders."""
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(reports_dir).resolve())).as_posix()
    except ValueError:  # another drive (Windows): the part below the pipeline's folder is still right
        return Path(*Path(path).parts[-2:]).as_posix()


def _stage_entry(run: Run, name: str, problems: list[Problem]) -> dict[str, Any]:
    record = run.stages[name]
    metrics = dict(record.metrics)
    if name == "train":
        metrics["curve"] = run.monitor.to_dict()
    causes = relabel(problems)
    return {
        "name": name,
        "status": record.status,
        "seconds": record.seconds,
        "findings": [{**f.to_dict(), "cause": causes.get(id(f), f.cause)} for f in record.findings],
        "problems": [p.to_dict() for p in problems if p.stage == name],
        "metrics": metrics,
        "configured_dtypes": record.configured_dtypes,
        "error": record.error,
        "reason": record.reason,
        "calls": record.calls,
    }


def _timing(run: Run) -> dict[str, Any]:
    """Where the time went: the user's training, kronfluence's stages for the run, and the doctor's own
    work around them (checks, probes, experiments, remedies, reports); their ratio is the same on any
    machine, so a CI gate can hold it where stage seconds cannot be compared."""
    import time

    total = run.options.prior_seconds + (time.perf_counter() - run.started if run.started is not None else 0.0)
    training = float(run.stages["train"].metrics.get("training_seconds") or 0.0)
    kronfluence = sum(record.seconds or 0.0 for name, record in run.stages.items() if name != "train")
    doctor = max(total - training - kronfluence, 0.0)
    return {
        "total_seconds": total,
        "training_seconds": training,
        "kronfluence_seconds": kronfluence,
        "doctor_seconds": doctor,
        "overhead_ratio": doctor / kronfluence if kronfluence > 0 else None,
    }


TOP_K = 3
"""Training examples listed per query in the report's top influences."""


def _scores_block(run: Run) -> dict[str, Any]:
    block: dict[str, Any] = {}
    for kind, stage in SCORE_STAGES.items():
        artifact = run.artifacts.get(stage)
        if artifact and run.stages[stage].completed:
            block[kind] = {**summarize_scores(total_scores(artifact)), "file": f"{SCORES_FILE}:{kind}"}
            if (tokens := tokens_of(artifact)) is not None:
                block[kind]["tokens"] = tokens  # per-token scores, summed over tokens above
    pairwise = run.artifacts.get("pairwise_scores")
    if pairwise and run.stages["pairwise_scores"].completed:
        block["top_influences"] = top_influences(run, total_scores(pairwise))
    return block


def top_influences(run: Run, scores: Any) -> list[dict[str, Any]]:
    """For each query, the training examples with the largest finite scores (indices into the full set)."""
    import torch

    queries = run.pipeline.query_labels
    train = run.pipeline.train_labels
    rows = []
    for row, query_index in enumerate(run.query_indices):
        values = scores[row].double()
        values = torch.where(torch.isfinite(values), values, torch.full_like(values, -torch.inf))
        best = torch.topk(values, k=min(TOP_K, values.numel())).indices.tolist()
        rows.append(
            {
                "query": query_index,
                "query_text": queries[query_index] if queries and query_index < len(queries) else None,
                "top": [
                    {
                        "train": run.train_indices[column],
                        "score": float(values[column]) if torch.isfinite(values[column]) else None,
                        "text": train[run.train_indices[column]] if train else None,
                    }
                    for column in best
                    if torch.isfinite(values[column])
                ],
            }
        )
    return rows
