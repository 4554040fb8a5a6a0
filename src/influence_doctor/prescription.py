"""The settings to use, as ready-to-paste Python: only the fields the remedies changed."""

from __future__ import annotations

from typing import Any

import torch

FACTOR_DEFAULTS_NOTE = "# changed fields only; keep the rest of your arguments as they are"


def changed_fields(original: Any, final: Any) -> dict[str, Any]:
    return {name: value for name, value in vars(final).items() if vars(original).get(name) != value}


def literal(value: Any) -> str:
    if isinstance(value, torch.dtype):
        return f"torch.{str(value).replace('torch.', '')}"
    if isinstance(value, float):
        return repr(value)
    return repr(value)


def render_arguments(kind: str, fields: dict[str, Any]) -> str:
    if not fields:
        return ""
    body = "".join(f"    {name}={literal(value)},\n" for name, value in fields.items())
    return f"{kind}(\n{body})"


def prescribe(
    original_factor_args: Any,
    original_score_args: Any,
    factor_args: Any,
    score_args: Any,
    batch_size_change: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The prescription block of the report: changed fields, and the Python to paste."""
    factor_changes = changed_fields(original_factor_args, factor_args)
    score_changes = changed_fields(original_score_args, score_args)
    parts = [render_arguments("FactorArguments", factor_changes), render_arguments("ScoreArguments", score_changes)]
    python = "\n".join(part for part in parts if part)
    if batch_size_change:
        python += f"\n# and a per-device batch size of {batch_size_change[1]} (was {batch_size_change[0]})"
    if python:
        python = (
            "import torch\nfrom kronfluence.arguments import FactorArguments, ScoreArguments\n\n"
            f"{FACTOR_DEFAULTS_NOTE}\n" + python
        )
    return {
        "factor_args": {k: _plain(v) for k, v in factor_changes.items()},
        "score_args": {k: _plain(v) for k, v in score_changes.items()},
        "batch_size": None if batch_size_change is None else batch_size_change[1],
        "python": python,
    }


def _plain(value: Any) -> Any:
    return str(value).replace("torch.", "") if isinstance(value, torch.dtype) else value
