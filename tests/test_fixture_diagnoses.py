"""The regression harness: every pathological fixture gets its cause and stage, and heals by the
expected rung (or stays sick when no factor setting can fix it), through the real runner."""

from __future__ import annotations

import pytest

from fixtures import FIXTURES, load_fixture
from influence_doctor import diagnose

HEALING_RUNG: dict[str, str | None] = {
    "fp16_covariance_overflow": "dtype:bfloat16",  # cures the overflow; dtype-drift then climbs to float32
    "fp16_score_overflow": "dtype:bfloat16",
    "rank_deficient_inputs": "shift:1e-4",
    "dead_relu": "damping:heuristic",
    "tiny_damping_ood_queries": "damping:heuristic",
    "diverging_training": None,
    "oscillating_training": None,
    "amp_fp16": "dtype:bfloat16",
    "eigenvectors_fp16": "dtype:float32",
}


def test_every_fixture_has_an_expected_rung():
    assert set(HEALING_RUNG) == set(FIXTURES)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_is_diagnosed_with_its_root_cause(name, tmp_path):
    pipeline, expected = load_fixture(name)
    report = diagnose(pipeline, fix=False, out_dir=tmp_path, progress=False)
    assert report.status == "sick"
    assert report.remedies == []
    first = report.problems[0]
    assert (first.cause, first.stage) == (expected["cause"], expected["stage"]), [
        (p.cause, p.stage) for p in report.problems
    ]
    # The stage entry of report.json carries the problem rooted there.
    stage = next(s for s in report.document["stages"] if s["name"] == expected["stage"])
    assert expected["cause"] in [p["cause"] for p in stage["problems"]]


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_heals_by_the_expected_rung(name, tmp_path):
    pipeline, expected = load_fixture(name)
    report = diagnose(pipeline, out_dir=tmp_path, progress=False)
    rung = HEALING_RUNG[name]
    if rung is None:
        # No factor setting can fix a broken model: no rung is tried, the advice is about training.
        assert report.status == "sick"
        assert report.remedies == []
        assert "learning rate" in report.problems[0].message
        return
    assert report.status == "healed", [(p.cause, p.stage, p.message) for p in report.problems]
    resolving = [
        r for r in report.remedies if r["cause"] == expected["cause"] and r["outcome"] in ("resolved", "healed")
    ]
    assert resolving and resolving[0]["rung"] == rung, report.remedies
    assert report.prescription["python"]
    assert report.document["fidelity"]["fix"] is not None
