"""`influence-doctor inspect`: check the factors and scores kronfluence already wrote, without the model.

`inspect_path` reads an analysis, factors or scores folder (partitioned files included) strictly
read-only, runs the same checks as `diagnose` on what it finds, and returns a JSON-ready document;
`render` turns that into terminal text or Markdown, and `write_document` saves it outside the folder.
"""

from __future__ import annotations

from influence_doctor.inspect.document import (
    DOCUMENT_NAME,
    build_document,
    check_out_dir,
    inspect_path,
    write_document,
)
from influence_doctor.inspect.reader import Source, read_path
from influence_doctor.inspect.render import render

__all__ = [
    "DOCUMENT_NAME",
    "Source",
    "build_document",
    "check_out_dir",
    "inspect_path",
    "read_path",
    "render",
    "write_document",
]
