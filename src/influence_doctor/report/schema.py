"""The report's JSON Schema: shipped in the package, printed by `influence-doctor schema`, and held
against every report the test suite writes, so the format cannot drift from what it promises."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

SCHEMA_FILE = "report.schema.json"


def schema_text() -> str:
    """The schema exactly as shipped."""
    return resources.files("influence_doctor.report").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")


@cache
def load_schema() -> dict[str, Any]:
    return json.loads(schema_text())


def schema_errors(document: dict[str, Any]) -> list[str]:
    """Every way `document` breaks the schema, as 'path: message' lines (empty: valid).

    Needs `jsonschema` (a dev dependency): validating is for tests and CI, not for writing reports.
    """
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema())
    errors = sorted(validator.iter_errors(document), key=lambda error: list(error.absolute_path))
    return [f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}" for error in errors]
