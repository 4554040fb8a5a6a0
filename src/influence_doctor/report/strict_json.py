"""Strict JSON for reports: no `NaN`/`Infinity` tokens, which strict parsers (and other languages) reject.

A non-finite number becomes `null`, and the reason sits beside it: for a field `x`, `x_nonfinite` is
`"inf"`, `"-inf"` or `"nan"`; for a list `xs`, `xs_nonfinite` maps each replaced position to its reason.
`number()` reads such a field back as the float it was.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

SUFFIX = "_nonfinite"


def _reason(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _nonfinite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def strict(value: Any) -> Any:
    """A copy of `value` (dicts, lists, scalars) with every non-finite float replaced as described above."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            if _nonfinite(inner):
                out[key] = None
                out[f"{key}{SUFFIX}"] = _reason(inner)
            elif isinstance(inner, list | tuple):
                replaced: dict[str, str] = {}
                out[key] = _strict_list(inner, "", replaced)
                if replaced:
                    out[f"{key}{SUFFIX}"] = replaced
            else:
                out[key] = strict(inner)
        return out
    if isinstance(value, list | tuple):
        return _strict_list(value, "", {})
    if _nonfinite(value):
        return None
    return value


_SCALARS = (int, float, str, bool, type(None))


def _strict_list(values: Any, prefix: str, replaced: dict[str, str]) -> list[Any]:
    if all(type(inner) in _SCALARS for inner in values) and not any(_nonfinite(inner) for inner in values):
        return list(values)  # a plain, finite list (a loss curve): nothing to replace, one quick pass
    out = []
    for index, inner in enumerate(values):
        path = f"{prefix}{index}"
        if _nonfinite(inner):
            replaced[path] = _reason(inner)
            out.append(None)
        elif isinstance(inner, list | tuple):
            out.append(_strict_list(inner, f"{path}.", replaced))
        else:
            out.append(strict(inner))
    return out


def dumps(document: Any, already_strict: bool = False) -> str:
    """The document as strict JSON text (indented, newline-terminated); raises if anything slipped through.
    `already_strict`: the document came from `strict` (writing it does not walk it twice)."""
    return json.dumps(document if already_strict else strict(document), indent=2, allow_nan=False) + "\n"


def number(mapping: Mapping[str, Any], key: str) -> float | None:
    """Read back a field written by `strict`: the float, inf/-inf/nan where it was replaced, or None."""
    value = mapping.get(key)
    if value is None:
        reason = mapping.get(f"{key}{SUFFIX}")
        return float(reason) if isinstance(reason, str) else None
    if isinstance(value, str):  # reports written before strict JSON spelled non-finite numbers as strings
        try:
            return float(value)
        except ValueError:
            return None
    return float(value) if isinstance(value, int | float) else None
