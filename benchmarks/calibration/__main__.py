"""False-alarm rates of the training and score heuristics on generated healthy cases (SPEC 4.1).

Healthy loss curves come from tiny models really trained with varied optimizers, batch sizes, run
lengths and noise; healthy score matrices from small pipelines really run through kronfluence (the
generator, `__init__.py`). Every finding on them is a false alarm: the tables give, per check, how many
cases it failed and warned. The margin table sets each heuristic's measured value on the healthy cases
(99th percentile, maximum) beside its limit and beside the sick fixtures, for contrast (from the
repository's root):

    .venv/bin/python -m benchmarks.calibration                    # 600 curves, 100 score cases, seed 12
    .venv/bin/python -m benchmarks.calibration --curves 1200 --score-cases 200 --seed 13

A seed listed in `influence_doctor.checks.rules.SEEDS_USED` derived a limit or informed a margin, a stated
choice or a change; the rates are printed for any seed, marked as not held out on those.

The training limits of `influence_doctor.checks.rules.LIMIT_RULES` and the score limits of
`SCORE_LIMIT_RULES` are derived first, from the derivation sets (600 healthy runs and 200 healthy
pipelines, seed 0), beside the values in use; every rate after that is measured on the held-out seed,
with real runs of four sick families (their detection rate per family).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

from benchmarks.calibration import (
    SICK_FAMILIES,
    TABLE_HEADERS,
    HealthyCurve,
    HealthyScores,
    derive_limits,
    derive_score_limits,
    family_outcome,
    healthy_loss_curves,
    healthy_score_cases,
    measured_findings,
    referenceless,
    score_alarms,
    score_metrics,
    sick_loss_curves,
    training_alarms,
    training_findings,
)
from influence_doctor.checks.rules import (
    DERIVATION_CURVES,
    DERIVATION_SEED,
    LIMIT_RULES,
    SCORE_DERIVATION_CASES,
    SCORE_LIMIT_RULES,
    SEEDS_USED,
    fresh_seed,
)
from influence_doctor.checks.thresholds import Thresholds

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the fixtures package lives at the top level

SICK_FIXTURES = ("oscillating_training", "diverging_training", "zero_damping")
MAX_FALSE_WARN = 0.05
"""SPEC 4.1: a heuristic may warn on at most this share of healthy cases, and fail on none."""

TRAINING_MARGINS: tuple[tuple[str, str, str], ...] = (
    ("loss_rise_significance", "loss_rise_significance", "train.loss_decreased"),
    ("divergence_significance", "divergence_significance", "train.divergence"),
    ("divergence_ratio", "divergence_ratio", "train.divergence"),
    ("start_rise_significance", "start_rise_significance", "train.divergence"),
    ("start_ratio", "start_rise_ratio", "train.divergence"),
    ("oscillation_significance", "oscillation_significance", "train.oscillation"),
    ("generalization_gap", "max_generalization_gap", "train.validation_gap"),
    ("trained_loss_ratio", "trained_loss_warn_ratio", "train.trained_loss"),
    ("reference_loss_ratio", "trained_loss_fail_ratio", "train.trained_loss"),
    ("uphill_cosine", "uphill_cosine", "train.uphill"),
    ("explosion_height", "explosion_height", "train.explosion"),
)
"""(metric of check_loss_curve, threshold it is held to, check)."""


def training_metrics(curve: Any) -> dict[str, Any]:
    return training_findings(curve, Thresholds())[1]


SCORE_MARGINS: tuple[tuple[str, str], ...] = (
    ("pairwise_max_robust_z", "outlier_mad"),
    ("self_max_robust_z", "self_outlier_mad"),
    ("query_scale_ratio", "query_scale_ratio"),
    ("dominant_share", "module_dominance_share"),
)


def quantile(values: list[float], share: float) -> float:
    finite = sorted(value for value in values if math.isfinite(value))
    if not finite:
        return math.nan
    return finite[min(len(finite) - 1, int(share * len(finite)))]


def sick_fixtures(names: Sequence[str]) -> dict[str, Any]:
    """Diagnose each sick fixture (no fixes, no probes): its train findings and measured values."""
    from fixtures import load_fixture
    from influence_doctor import diagnose
    from influence_doctor.checks.train import SampleLoss

    results = {}
    for name in names:
        pipeline, _expected = load_fixture(name)
        with tempfile.TemporaryDirectory() as out:
            report = diagnose(pipeline, fix=False, progress=False, probe_examples=0, out_dir=out)
        run = report.run
        sample = run.stages["train"].metrics.get("sample_loss")
        curve = HealthyCurve(
            name,
            run.monitor.loss,
            run.monitor.validation_loss,
            None if sample is None else SampleLoss(**sample),
        )
        scores = HealthyScores(
            name, dict(run.artifacts.get("pairwise_scores") or {}), dict(run.artifacts.get("self_scores") or {})
        )
        results[name] = {
            "findings": [f for f in run.stages["train"].findings if f.check.startswith("train.")],
            "training": training_metrics(curve),
            "scores": score_metrics(scores),
        }
    return results


def _cell(value: float | None) -> str:
    """A measured value, or a dash where the check could not measure it (a non-finite loss, no scores)."""
    return "—" if value is None or not math.isfinite(value) else f"{value:.3g}"


def margin_rows(
    names: Sequence[tuple[str, str]],
    healthy: list[dict[str, Any]],
    sick: dict[str, dict[str, Any]],
    metrics_of: Callable[[dict[str, Any]], dict[str, Any]],
) -> list[list[Any]]:
    thresholds = Thresholds()
    rows = []
    for metric, limit in names:
        values = [float(m[metric]) for m in healthy if m.get(metric) is not None]
        sick_values = [f"{name}: {_cell(metrics_of(result).get(metric))}" for name, result in sick.items()]
        rows.append(
            [
                metric,
                f"{thresholds.value(limit):.3g}",
                f"{quantile(values, 0.99):.3g}",
                f"{max((v for v in values if math.isfinite(v)), default=math.nan):.3g}",
                ", ".join(sick_values),
            ]
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.calibration", description=__doc__.splitlines()[0])
    parser.add_argument("--curves", type=int, default=600, help="healthy training curves (default 600)")
    parser.add_argument("--score-cases", type=int, default=100, help="healthy score cases (default 100)")
    parser.add_argument(
        "--seed",
        type=int,
        default=12,
        help="seed the rates are measured on (default 12; see SEEDS_USED for the seeds that informed something)",
    )
    parser.add_argument("--sick", type=int, default=200, help="runs per sick family (default 200)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    defaults = Thresholds()
    headers = ["limit", "healthy metric", "percentile", "margin", "derived", "in use", "equal"]
    for title, rules, derived in (
        (
            f"Training limits derived from {DERIVATION_CURVES} healthy runs (seed {DERIVATION_SEED})",
            LIMIT_RULES,
            derive_limits(healthy_loss_curves(DERIVATION_CURVES, seed=DERIVATION_SEED)),
        ),
        (
            f"Score limits derived from {SCORE_DERIVATION_CASES} healthy pipelines (seed {DERIVATION_SEED})",
            SCORE_LIMIT_RULES,
            derive_score_limits(healthy_score_cases(SCORE_DERIVATION_CASES, seed=DERIVATION_SEED)),
        ),
    ):
        rows = [
            [
                rule.threshold,
                rule.metric,
                "maximum" if rule.percentile >= 1.0 else f"{rule.percentile:.1%} percentile",
                f"×{rule.margin:g}",
                f"{derived[rule.threshold]:g}",
                f"{defaults.value(rule.threshold):g}",
                "yes" if derived[rule.threshold] == defaults.value(rule.threshold) else "NO",
            ]
            for rule in rules
        ]
        print(f"{title}:")
        print(tabulate(rows, headers=headers, tablefmt="simple") + "\n")
    if not fresh_seed(args.seed):
        print(f"Seed {args.seed} is NOT held out: it {SEEDS_USED[args.seed]}.\n")
    print(f"Sick families, {args.sick} real runs each (seed {args.seed}):")
    rows = []
    for family, cause in SICK_FAMILIES.items():
        curves = sick_loss_curves(family, args.sick, seed=args.seed)
        for path, measured in (("with the evidence", curves), ("reference-less", [referenceless(c) for c in curves])):
            outcome = family_outcome(measured, family)
            met = "met" if outcome.rate >= 0.99 else "NOT MET"
            aside = outcome.runs - outcome.members
            rows.append([family, path, cause, outcome.runs, aside, outcome.detected, f"{100 * outcome.rate:.1f}", met])
    headers = [
        "family",
        "path",
        "cause (a fail)",
        "runs",
        "recovered (set aside)",
        "detected",
        "% of the rest",
        "≥ 99%",
    ]
    print(tabulate(rows, headers=headers, tablefmt="simple"))
    print()

    started = time.perf_counter()
    curves = healthy_loss_curves(args.curves, seed=args.seed)
    curve_seconds = time.perf_counter() - started
    started = time.perf_counter()
    score_cases = healthy_score_cases(args.score_cases, seed=args.seed)
    score_seconds = time.perf_counter() - started
    sick = sick_fixtures(SICK_FIXTURES)

    for title, seconds, rates in (
        (f"{len(curves)} healthy training curves", curve_seconds, training_alarms(curves)),
        (
            f"{len(curves)} healthy training curves, reference-less (a model beyond the evidence budget)",
            curve_seconds,
            training_alarms([referenceless(curve) for curve in curves]),
        ),
        (f"{len(score_cases)} healthy score cases", score_seconds, score_alarms(score_cases)),
    ):
        print(f"False alarms on {title} (seed {args.seed}, {seconds:.1f} s to generate):")
        print(tabulate(rates.rows(), headers=TABLE_HEADERS, tablefmt="simple"))
        worst_warn = max([rates.rate("warn", check) for check in rates.checked] + [rates.rate("warn")])
        met = rates.count("fail") == 0 and worst_warn <= MAX_FALSE_WARN
        print(
            f"target (no false fail, false warn <= {MAX_FALSE_WARN:.0%} per check and overall): "
            f"{'met' if met else 'NOT MET'}\n"
        )

    drawn_sick = measured_findings(score_cases)
    print(f"Measured wrong numbers among the {len(score_cases)} generated pipelines (sick as drawn, not false alarms):")
    for name, finding in drawn_sick or [("none", None)]:
        print(f"  {name}" + (f": {finding.check} {finding.severity}, {finding.message}" if finding else ""))
    print()

    margin_headers = ["measured value", "limit", "healthy 99%", "healthy max", "sick fixtures"]
    healthy_training = [training_metrics(curve) for curve in curves]
    training_names = [(metric, limit) for metric, limit, _check in TRAINING_MARGINS]
    print("Training heuristics: healthy values against the limit and the sick fixtures")
    print(
        tabulate(
            margin_rows(training_names, healthy_training, sick, lambda result: result["training"]),
            headers=margin_headers,
            tablefmt="simple",
        )
    )
    healthy_scores = [score_metrics(case) for case in score_cases]
    print("\nScore heuristics: healthy values against the limit and the sick fixtures")
    print(
        tabulate(
            margin_rows(SCORE_MARGINS, healthy_scores, sick, lambda result: result["scores"]),
            headers=margin_headers,
            tablefmt="simple",
        )
    )
    print("\nTraining findings on the sick fixtures:")
    rows = [
        [name, f.check, f.severity, f.cause, f"{f.value:.3g}" if f.value is not None else "", f.message]
        for name, result in sick.items()
        for f in result["findings"]
    ]
    print(tabulate(rows, headers=["fixture", "check", "severity", "cause", "value", "message"], tablefmt="simple"))


if __name__ == "__main__":
    main()
