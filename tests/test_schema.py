"""The report's JSON Schema: shipped, printed by the CLI, in step with the code's vocabularies, and
strict enough to reject what a report must never hold."""

from __future__ import annotations

import copy
import json

import pytest

from influence_doctor import diagnose
from influence_doctor.causes import TAGS as CAUSES
from influence_doctor.examine import STAGE_STATUSES
from influence_doctor.findings import SEVERITY_RANK
from influence_doctor.pipeline import STAGES
from influence_doctor.report.document import TOP_LEVEL_KEYS
from influence_doctor.report.schema import load_schema, schema_errors
from tests.conftest import ROOT
from tests.pipelines import small_pipeline


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return diagnose(small_pipeline(), out_dir=tmp_path_factory.mktemp("reports"), progress=False, probe_examples=0)


def test_schema_command_prints_the_shipped_schema(cli):
    result = cli("schema")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == load_schema()
    assert load_schema()["$schema"].endswith("2020-12/schema")


def test_schema_vocabularies_are_the_codes(tmp_path):
    schema = load_schema()
    definitions = schema["$defs"]
    assert tuple(schema["required"]) == TOP_LEVEL_KEYS
    assert definitions["stage_name"]["enum"] == list(STAGES)
    assert [c for c in definitions["cause"]["enum"] if c is not None] == list(CAUSES)
    assert definitions["finding"]["properties"]["severity"]["enum"] == list(SEVERITY_RANK)
    assert definitions["stage"]["properties"]["status"]["enum"] == list(STAGE_STATUSES)


def test_a_real_report_and_the_committed_baselines_validate(report):
    assert schema_errors(report.document) == []
    assert schema_errors(json.loads(report.json_path.read_text())) == []
    baselines = sorted((ROOT / "reports" / "baselines").glob("*/report.json"))
    assert baselines
    for path in baselines:
        assert schema_errors(json.loads(path.read_text())) == [], path


@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        (lambda d: d.update(status="fine"), "status"),
        (lambda d: d["stages"][1]["findings"].append({**_finding(), "cause": "bad-luck"}), "cause"),
        (lambda d: d["stages"][1]["findings"].append({**_finding(), "severity": "error"}), "severity"),
        (lambda d: d["pipeline"].update(run_dir="/home/someone/reports/small/1"), "run_dir"),
        (lambda d: d["scores"]["pairwise"].update(finite_fraction="NaN"), "finite_fraction"),
        (lambda d: d.update(gates=[{"name": "status", "value": 1, "limit": 0, "verdict": "maybe"}]), "gates"),
        (lambda d: d.pop("projection"), "projection"),
        (lambda d: d.update(extra=1), "extra"),
    ],
)
def test_the_schema_rejects_what_a_report_must_never_hold(report, edit, complaint):
    document = copy.deepcopy(report.document)
    edit(document)
    errors = schema_errors(document)
    assert errors and any(complaint in error for error in errors), errors


def _finding() -> dict:
    return {
        "check": "covariance.finite",
        "stage": "covariance",
        "subject": "",
        "severity": "warn",
        "value": 1.0,
        "limit": 0.0,
        "cause": None,
        "message": "x",
    }


def test_the_session_hook_tells_a_truncated_report_of_the_doctor_from_a_tests_bad_input():
    """The schema hook must fail the session on a report.json the doctor wrote that does not parse,
    and leave alone the bad input a test wrote on purpose."""
    from tests.conftest import written_by_the_doctor

    real = (ROOT / "reports" / "baselines" / "small" / "report.json").read_text()
    assert written_by_the_doctor(real[: len(real) // 2])  # cut in the middle: still ours
    assert not written_by_the_doctor('{"hello": 1}')
    assert not written_by_the_doctor("not json at all")


def test_the_shipped_schema_is_generated_from_the_cause_table():
    """The cause enum and the stage names are written from the code (`python -m influence_doctor.report.schema`)."""
    from influence_doctor.report.schema import generated_schema_text, schema_text

    assert schema_text() == generated_schema_text()
    assert generated_schema_text(schema_text().replace('"fp16-overflow", ', "")) == schema_text()


def test_the_readme_lists_the_causes_of_the_table():
    """The README's list of causes is written from the cause table (`make generated`)."""
    from pathlib import Path

    from influence_doctor.causes import with_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert with_table(readme) == readme
