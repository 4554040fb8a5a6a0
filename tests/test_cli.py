"""The real `influence-doctor` command in a subprocess, end to end on a built-in demo."""

from __future__ import annotations

import json
import os

import pytest

from influence_doctor import STAGES
from influence_doctor.report.document import TOP_LEVEL_KEYS


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_diagnose_uci_mlp_end_to_end(cli, tmp_path):
    done = cli("diagnose", "--demo", "uci-mlp", "--out", str(tmp_path), "--format", "json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    (report_path,) = tmp_path.glob("uci-mlp/*/report.json")
    on_disk = json.loads(report_path.read_text())
    assert printed == on_disk  # --format json prints exactly the report document
    assert tuple(on_disk) == TOP_LEVEL_KEYS
    assert on_disk["status"] == "healthy"
    assert [stage["name"] for stage in on_disk["stages"]] == list(STAGES)
    assert all(stage["status"] in ("ok", "warn") for stage in on_disk["stages"])  # warnings, never a fail
    assert all(isinstance(stage["seconds"], float) for stage in on_disk["stages"])
    assert on_disk["environment"]["device"] == "cpu"
    assert on_disk["environment"]["kronfluence"] == "1.0.1"
    # The rehearsal is sized by time: a tenth of this fast run would be tiny, so the 256-example minimum.
    assert on_disk["scores"]["pairwise"]["shape"] == [16, 256]
    plan = on_disk["pipeline"]["rehearsal"]["plan"]
    assert plan["examples"] == 256 and "minimum" in plan["chosen_by"]
    assert on_disk["projection"]["examples_full"] == 1000 and set(on_disk["projection"]["stages"]) == set(STAGES[1:])
    # The healthy verdict rests on a measurement: float64 at the same damping agrees, per query.
    assert on_disk["fidelity"]["float64"]["pairwise"]["median_spearman"] > 0.999
    json.loads(report_path.read_text(), parse_constant=lambda token: pytest.fail(f"{token} in strict JSON"))
    markdown = (report_path.parent / "report.md").read_text()
    assert "Scores vs float64 at the same damping (probe subsample): pairwise median per-query Spearman" in markdown
    # Progress went to stderr, one line per stage.
    for stage in STAGES:
        assert stage in done.stderr
    assert (report_path.parent / "report.md").read_text().startswith("# influence-doctor: uci-mlp")
    page = (report_path.parent / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "HEALTHY" in page
    assert page.count("<figure id=") == 7 and "<svg" in page  # every figure, drawn inline
    assert oct(report_path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # ordinary permissions


def test_diagnose_target_text_output_and_reports(cli, tmp_path):
    done = cli("diagnose", "tests.pipelines:small", "--out", str(tmp_path), "--examples", "32", "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "Status: HEALTHY" in done.stdout
    assert "32 of 64 training examples" in done.stdout
    for stage in STAGES:
        assert stage in done.stdout
    report_line = done.stdout.strip().splitlines()[-1]
    assert report_line.startswith("Report: ") and report_line.endswith("report.json")


def test_diagnose_md_format(cli, tmp_path):
    done = cli("diagnose", "tests.pipelines:small", "--out", str(tmp_path), "--format", "md", "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# influence-doctor: small")
    assert "| stage" in done.stdout


def test_sick_pipeline_exits_1(cli, tmp_path):
    target = tmp_path / "broken.py"
    target.write_text(
        "from tests.pipelines import small_pipeline\n"
        "def broken():\n"
        "    def train(model, data, monitor):\n"
        "        raise ValueError('loss exploded')\n"
        "    return small_pipeline(train=train)\n"
    )
    done = cli("diagnose", f"{target}:broken", "--out", str(tmp_path / "r"), "--quiet")
    assert done.returncode == 1
    assert "Status: SICK" in done.stdout
    assert "ValueError: loss exploded" in done.stdout
