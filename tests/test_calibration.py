"""SPEC 4.1: the training and score heuristics, on generated healthy cases, fail nothing and warn rarely."""

from __future__ import annotations

import math

import pytest

from influence_doctor.calibration import (
    TRAINING_CHECKS,
    AlarmRates,
    draw_recipe,
    healthy_loss_curves,
    healthy_score_cases,
    score_alarms,
    training_alarms,
)
from influence_doctor.findings import Finding

MAX_FALSE_WARN = 0.05


def _finding(check: str, severity: str) -> Finding:
    return Finding(check, "train", "loss", severity, 1.0, 0.0, None, "x")


def test_alarm_rates_count_cases_not_findings():
    rates = AlarmRates()
    rates.add([_finding("a", "warn"), _finding("a", "warn"), _finding("b", "fail")], {"a", "b"})
    rates.add([], {"a"})
    assert rates.cases == 2
    assert rates.count("warn", "a") == 1
    assert rates.rate("warn", "a") == 0.5
    assert rates.rate("fail", "b") == 1.0  # b was applied to one case only
    assert rates.rate("fail") == 0.5
    assert rates.rows()[-1] == ["any check", 2, 1, "50.0", 1, "50.0"]


def test_recipes_cover_every_batch_size_optimizer_and_task():
    import random

    rng = random.Random(0)
    recipes = [draw_recipe(index, rng) for index in range(30)]
    assert {(r.batch_size, r.optimizer, r.task) for r in recipes} == {
        (batch, optimizer, task)
        for batch in (1, 2, 8, 32, None)
        for optimizer in ("sgd", "momentum", "adam")
        for task in ("regression", "classification")
    }
    assert all(20 <= r.steps <= 300 for r in recipes)


@pytest.fixture(scope="module")
def curves():
    return healthy_loss_curves(120, seed=0)


def test_healthy_curves_are_real_varied_and_trained(curves):
    assert len(curves) >= 100
    lengths = [len(curve.loss) for curve in curves]
    assert min(lengths) >= 20 and max(lengths) <= 300 and len(set(lengths)) > 50
    assert all(all(math.isfinite(value) for value in curve.loss) for curve in curves)
    assert {"batch=1", "batch=full"} <= {part for curve in curves for part in curve.name.split()}
    improved = [curve for curve in curves if _first(curve.validation_loss) > _last(curve.validation_loss)]
    assert len(improved) >= 0.95 * len(curves)  # the models learned: their held-out loss went down


def test_training_checks_never_fail_and_rarely_warn_on_healthy_curves(curves):
    rates = training_alarms(curves)
    assert rates.cases == len(curves)
    assert rates.count("fail") == 0, rates.fail
    assert rates.rate("warn") <= MAX_FALSE_WARN, rates.warn
    for check in TRAINING_CHECKS:
        assert rates.rate("warn", check) <= MAX_FALSE_WARN, check


def _first(values):
    return next(value for value in values if value is not None)


def _last(values):
    return next(value for value in reversed(values) if value is not None)


@pytest.mark.slow
def test_score_heuristics_never_fail_and_rarely_warn_on_healthy_pipelines():
    """A small set (the benchmark measures the rates on hundreds): no fail, and warnings on at most 5% of
    the cases, per heuristic and in all (the heuristics tend to fire together, on the same pipeline)."""
    cases = healthy_score_cases(20, seed=0)
    assert len(cases) == 20
    assert all(case.pairwise and case.self_scores for case in cases)
    assert {"heuristic", "1e-08"} <= {
        part.split("=")[1] for case in cases for part in case.name.split() if "damping=" in part
    }
    rates = score_alarms(cases)
    assert rates.checked["scores.module_dominance"] >= 5  # per-module scores, too
    assert rates.count("fail") == 0, rates.fail
    assert rates.count("warn") <= MAX_FALSE_WARN * rates.cases, rates.warn
    for check in ("scores.outliers", "scores.query_scale", "scores.module_dominance"):
        assert rates.count("warn", check) <= MAX_FALSE_WARN * rates.cases, (check, rates.warn)
