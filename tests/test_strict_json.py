"""Reports are strict JSON: no NaN/Infinity tokens, and every replaced number keeps its reason."""

from __future__ import annotations

import json
import math

from hypothesis import given
from hypothesis import strategies as st

from influence_doctor.report.strict_json import dumps, number, strict

leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text())
documents = st.recursive(
    leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)),
    max_leaves=20,
)


def _reject(token):
    raise ValueError(f"non-strict token {token}")


@given(documents)
def test_any_document_becomes_strict_json(document):
    text = dumps({"root": document})
    json.loads(text, parse_constant=_reject)


def test_a_nonfinite_field_is_null_with_its_reason_and_reads_back():
    document = strict({"value": math.inf, "limit": -math.inf, "spearman": math.nan, "ok": 1.5})
    assert document == {
        "value": None,
        "value_nonfinite": "inf",
        "limit": None,
        "limit_nonfinite": "-inf",
        "spearman": None,
        "spearman_nonfinite": "nan",
        "ok": 1.5,
    }
    assert number(document, "value") == math.inf
    assert number(document, "limit") == -math.inf
    assert math.isnan(number(document, "spearman"))
    assert number(document, "ok") == 1.5
    assert number(document, "missing") is None


def test_lists_keep_their_length_and_name_each_replaced_position():
    document = strict({"loss": [1.0, math.nan, 0.5, math.inf], "grid": [[1.0, -math.inf]]})
    assert document["loss"] == [1.0, None, 0.5, None]
    assert document["loss_nonfinite"] == {"1": "nan", "3": "inf"}
    assert document["grid"] == [[1.0, None]]
    assert document["grid_nonfinite"] == {"0.1": "-inf"}


def test_reports_of_older_versions_spelled_nonfinite_numbers_as_strings():
    assert number({"condition": "inf"}, "condition") == math.inf
    assert number({"condition": "n/a"}, "condition") is None
