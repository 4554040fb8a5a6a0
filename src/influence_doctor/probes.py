"""Bounded extra computations that measure what the main run cannot see by itself.

- precision: the factor stages and self scores re-run on a small subsample twice — as configured and in
  float64 — to measure what the configured precision costs (relative factor error, score Spearman).
- damping sensitivity: self scores of that subsample with 10× the damping, ranked against the main
  factors' scores, to show whether rankings depend on the damping guess.
Both reuse the run's Analyzer and write only inside the run's own folder.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Any

import torch
from torch.utils.data import Subset

from influence_doctor.checks.outcome import CheckOutcome
from influence_doctor.checks.precision import (
    check_factor_precision,
    check_score_precision,
    check_stored_dtypes,
    rank_agreement,
)
from influence_doctor.checks.scores import check_damping_sensitivity
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.environment import seed_everything
from influence_doctor.remedies.rungs import heuristic_damping
from influence_doctor.report.scores import total_scores
from influence_doctor.runner.run import Run, StageRecord
from influence_doctor.runner.stages import quiet_kronfluence, settle_status

FLOAT64_FACTOR_FIELDS = (
    "activation_covariance_dtype",
    "gradient_covariance_dtype",
    "eigendecomposition_dtype",
    "per_sample_gradient_dtype",
    "lambda_dtype",
)
FLOAT64_SCORE_FIELDS = ("per_sample_gradient_dtype", "precondition_dtype", "score_dtype")


def probe_subset(run: Run, examples: int) -> Subset:
    """The first `examples` of the rehearsal subsample: small, fixed, reproducible."""
    return Subset(run.train_subset, list(range(min(examples, len(run.train_subset)))))


def run_probes(run: Run, examples: int = 64, thresholds: Thresholds | None = None) -> dict[str, Any]:
    """Run both probes when their inputs exist; findings go onto the stages they describe.

    Returns a summary for the report (seconds, sizes, measured agreement). A probe that raises is
    recorded there and never breaks the run.
    """
    thresholds = thresholds or Thresholds()
    summary: dict[str, Any] = {"examples": min(examples, len(run.train_subset or []))}
    if run.analyzer is None or not summary["examples"]:
        return summary
    bars, run.analyzer.disable_tqdm = run.analyzer.disable_tqdm, True  # probes are quick: no bars
    for name, probe in (("precision", _precision_probe), ("damping", _damping_probe)):
        started = time.perf_counter()
        try:
            summary[name] = probe(run, examples, thresholds)
        except Exception as exc:  # a probe is a measurement; its failure is reported, not fatal
            summary[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        summary[name]["seconds"] = time.perf_counter() - started
    run.analyzer.disable_tqdm = bars
    for record in run.stages.values():
        settle_status(record)
    return summary


def _factors_done(run: Run) -> bool:
    factor_stages = ("covariance", "eigendecomposition", "lambda")
    return all(run.stages[name].status in ("ok", "warn", "fail", "skipped") for name in factor_stages)


def _precision_probe(run: Run, examples: int, thresholds: Thresholds) -> dict[str, Any]:
    """Configured vs float64 on the same small subsample: what precision costs, factor by factor."""
    float64_factors = copy.deepcopy(run.factor_args)
    for name in FLOAT64_FACTOR_FIELDS:
        setattr(float64_factors, name, torch.float64)
    float64_factors.amp_dtype = None
    float64_scores = copy.deepcopy(run.score_args)
    for name in FLOAT64_SCORE_FIELDS:
        setattr(float64_scores, name, torch.float64)
    float64_scores.amp_dtype = None
    subset = probe_subset(run, examples)
    configured = _mini_run(run, "probe_configured", run.factor_args, run.score_args, subset)
    reference = _mini_run(run, "probe_float64", float64_factors, float64_scores, subset)
    result: dict[str, Any] = {"configured_errors": configured["errors"], "float64_errors": reference["errors"]}
    for stage, factor_names, dtype_field in (
        ("covariance", ("activation_covariance", "gradient_covariance"), None),
        ("lambda", ("lambda_matrix",), "lambda_dtype"),
    ):
        if stage not in configured or stage not in reference:
            continue
        for factor in factor_names:
            dtype = getattr(run.factor_args, dtype_field or f"{factor}_dtype")
            for module, tensor in configured[stage][factor].items():
                outcome = check_factor_precision(
                    tensor, reference[stage][factor][module], f"{module}/{factor}", stage, dtype, thresholds
                )
                _attach(run.stages[stage], f"{module}/{factor}", outcome)
    if "self" in configured and "self" in reference:
        stage = "self_scores" if "self_scores" in run.artifacts else "pairwise_scores"
        outcome = check_score_precision(configured["self"], reference["self"], stage, "self", thresholds)
        _attach(run.stages[stage], "precision", outcome)
        result["spearman_vs_float64"] = outcome.metrics["spearman_vs_float64"]
    for stage, configured_dtypes in (
        (
            "covariance",
            {
                f: str(getattr(run.factor_args, f"{f}_dtype")).replace("torch.", "")
                for f in ("activation_covariance", "gradient_covariance")
            },
        ),
        ("lambda", {"lambda_matrix": str(run.factor_args.lambda_dtype).replace("torch.", "")}),
    ):
        stored = run.stages[stage].metrics.get("stored", {})
        stored_dtypes = {
            factor: next(iter(per_module.values()))["dtype"]
            for factor, per_module in stored.items()
            if factor in configured_dtypes and per_module
        }
        _attach(run.stages[stage], "dtypes", check_stored_dtypes(stage, configured_dtypes, stored_dtypes))
    return result


def _mini_run(run: Run, name: str, factor_args: Any, score_args: Any, subset: Subset) -> dict[str, Any]:
    """Covariance → eigendecomposition → lambda → self scores on `subset`, under factors `name`."""
    analyzer, batch = run.analyzer, run.train_batch_size
    out: dict[str, Any] = {"errors": {}}
    steps = (
        (
            "covariance",
            lambda: analyzer.fit_covariance_matrices(
                factors_name=name,
                dataset=subset,
                per_device_batch_size=batch,
                factor_args=factor_args,
                overwrite_output_dir=True,
            ),
            lambda: analyzer.load_covariance_matrices(name),
        ),
        (
            "eigendecomposition",
            lambda: analyzer.perform_eigendecomposition(
                factors_name=name, factor_args=factor_args, overwrite_output_dir=True
            ),
            lambda: None,
        ),
        (
            "lambda",
            lambda: analyzer.fit_lambda_matrices(
                factors_name=name,
                dataset=subset,
                per_device_batch_size=batch,
                factor_args=factor_args,
                overwrite_output_dir=True,
            ),
            lambda: analyzer.load_lambda_matrices(name),
        ),
        ("self", lambda: None, lambda: probe_scores(run, "self", f"{name}_self", name, subset, score_args)),
    )
    for index, (stage, compute, load) in enumerate(steps):
        seed_everything(run.seed + 100 + index)
        try:
            with quiet_kronfluence():
                compute()
            loaded = load()
        except Exception as exc:  # e.g. eigh failing on the configured precision: that is the finding
            out["errors"][stage] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            return out
        if loaded is not None:
            out[stage] = loaded
    return out


def probe_scores(
    run: Run, kind: str, scores_name: str, factors_name: str, subset: Subset, score_args: Any
) -> torch.Tensor:
    """Pairwise (all queries × `subset`) or self scores of `subset` under `factors_name`, summed over modules."""
    analyzer, batch = run.analyzer, run.train_batch_size
    with quiet_kronfluence():
        if kind == "pairwise":
            analyzer.compute_pairwise_scores(
                scores_name=scores_name,
                factors_name=factors_name,
                query_dataset=run.query_subset,
                train_dataset=subset,
                per_device_query_batch_size=run.pipeline.query_batch_size,
                per_device_train_batch_size=batch,
                score_args=score_args,
                overwrite_output_dir=True,
            )
            return total_scores(analyzer.load_pairwise_scores(scores_name))
        analyzer.compute_self_scores(
            scores_name=scores_name,
            factors_name=factors_name,
            train_dataset=subset,
            per_device_train_batch_size=batch,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        return total_scores(analyzer.load_self_scores(scores_name))


def _damping_probe(run: Run, examples: int, thresholds: Thresholds) -> dict[str, Any]:
    """Scores of the probe subset under the run's damping and under 10× its effective value.

    A damping below the rounding floor (eps·λmax) acts as zero, so "10×" is taken of whichever is
    larger: the damping or the floor. Pairwise scores are used when the pipeline computes them (they
    are what out-of-distribution queries distort), self scores otherwise.
    """
    if not _factors_done(run):
        return {"skipped": "the factors did not complete"}
    kind = "pairwise" if "pairwise" in run.pipeline.scores else "self"
    stage = f"{kind}_scores"
    if not run.stages[stage].completed:
        return {"skipped": f"the {kind} scores did not complete"}
    damping = run.score_args.damping_factor
    if damping is None:
        damping = heuristic_damping(run.artifacts, run.factor_args.strategy)
        if damping is None or not math.isfinite(damping):
            return {"skipped": "no finite curvature to derive the heuristic damping from"}
    floor = _damping_floor(run)
    tiny = floor is not None and damping < floor
    raised = 10.0 * max(damping, floor or 0.0)
    subset = probe_subset(run, examples)
    main = total_scores(run.artifacts[stage])
    # The probe subset is the head of the rehearsal subsample: the main run already scored it.
    baseline = main[..., : len(subset)] if kind == "pairwise" else main[: len(subset)]
    args = copy.deepcopy(run.score_args)
    args.damping_factor = raised
    name = f"{run.factors_name}{run.scores_tag}_probe_damping"
    seed_everything(run.seed + 200)
    probed = probe_scores(run, kind, name, run.factors_name, subset, args)
    agreement = _row_agreement(baseline, probed) if kind == "pairwise" else rank_agreement(baseline, probed)
    _attach(run.stages[stage], "damping", check_damping_sensitivity(stage, agreement, thresholds, tiny=tiny))
    return {"damping": damping, "floor": floor, "compared_with": raised, "scores": kind, "spearman_x10": agreement}


def _row_agreement(first: torch.Tensor, second: torch.Tensor) -> float:
    """The median per-query Spearman: how stable a typical query's ranking of training examples is."""
    values = [rank_agreement(a, b) for a, b in zip(first, second, strict=True)]
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def _damping_floor(run: Run) -> float | None:
    """Median over modules of eps(precondition dtype)·λmax, as measured by the conditioning checks."""
    floors = [
        metrics["damping_floor"]
        for name in ("lambda", "eigendecomposition")
        for metrics in run.stages[name].metrics.get("checks", {}).values()
        if isinstance(metrics, dict)
        and isinstance(metrics.get("damping_floor"), float)
        and math.isfinite(metrics["damping_floor"])
    ]
    return float(torch.tensor(floors).median()) if floors else None


def _attach(record: StageRecord, subject: str, outcome: CheckOutcome) -> None:
    record.findings.extend(outcome.findings)
    if outcome.metrics:
        record.metrics.setdefault("probes", {}).setdefault(subject, {}).update(outcome.metrics)
