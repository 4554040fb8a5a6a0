"""The report's JSON Schema: shipped in the package, printed by `influence-doctor schema`, and held
against every report the test suite writes, so the format cannot drift from what it promises.

Its vocabularies are generated, not written: the cause enum from the cause table (`causes.TAGS`) and the
stage names from `pipeline.STAGES`. `python -m influence_doctor.report.schema` rewrites the shipped file
from them (a new cause is its row, and this command); a test holds the file equal to what it generates.
"""

from __future__ import annotations

import json
import re
import sys
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

SCHEMA_FILE = "report.schema.json"


def schema_text() -> str:
    """The schema exactly as shipped."""
    return resources.files("influence_doctor.report").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")


def generated_schema_text(text: str | None = None) -> str:
    """The shipped schema with its vocabularies written from the code: the cause enum from the cause
    table (and null, for a finding no cause explains), the stage names from the pipeline's stages."""
    from influence_doctor.causes import TAGS
    from influence_doctor.pipeline import STAGES

    text = schema_text() if text is None else text
    for name, values in (("cause", [*TAGS, None]), ("stage_name", list(STAGES))):
        line = f'"{name}": {{"enum": {json.dumps(values)}}},'
        text, count = re.subn(rf'"{name}": \{{"enum": \[[^\]]*\]\}},', lambda _match, line=line: line, text)
        if count != 1:
            raise ValueError(f"the schema has no single {name!r} enum to write")
    return text


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


def main() -> int:
    """Rewrite the shipped schema file from the code's vocabularies."""
    path = Path(__file__).with_name(SCHEMA_FILE)
    path.write_text(generated_schema_text(path.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
