"""The settings to use, as ready-to-paste Python: only the fields the remedies changed, and, where the
fidelity bar rejected every rung, the best option as advice with its measured cost."""

from __future__ import annotations

from typing import Any

import torch

FACTOR_DEFAULTS_NOTE = "# changed fields only; keep the rest of your arguments as they are"

TASK_PRESCRIPTION = (
    'in your Task, return the sum over examples (e.g. F.cross_entropy(logits, labels, reduction="sum")): '
    "the doctor multiplied each batch's mean by its size"
)

CHECKPOINT_PRESCRIPTION = (
    "in your model, torch.utils.checkpoint.checkpoint(..., use_reentrant=False), or no checkpointing while "
    "you compute influence: the doctor ran every checkpoint non-reentrant (the same numbers)"
)

FIDELITY_KEYS = ("reference", "median_spearman", "worst_spearman", "top_overlap", "examples", "queries")


def _fields(arguments: Any) -> dict[str, Any]:
    """kronfluence's arguments (or the configuration's immutable ones) as field → value."""
    return arguments.as_dict() if hasattr(arguments, "as_dict") else dict(vars(arguments))


def changed_fields(original: Any, final: Any) -> dict[str, Any]:
    before = _fields(original)
    return {name: value for name, value in _fields(final).items() if before.get(name) != value}


def literal(value: Any) -> str:
    if isinstance(value, torch.dtype):
        return f"torch.{str(value).replace('torch.', '')}"
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


def prescription_for(asked: Any, final: Any) -> dict[str, Any]:
    """What to change from the configuration asked for (`configuration.Configuration`) to the final one:
    kronfluence's arguments, the batch size, and the Task when it was made a sum."""
    batch = None if final.batch_size == asked.batch_size else (asked.batch_size, final.batch_size)
    prescription = prescribe(asked.factor_args, asked.score_args, final.factor_args, final.score_args, batch)
    if final.summed_task and not asked.summed_task:
        prescription["task"] = TASK_PRESCRIPTION
        prescription["python"] = f"{prescription['python']}\n# {TASK_PRESCRIPTION}".lstrip("\n")
    if final.recompute != asked.recompute:
        prescription["checkpointing"] = final.recompute
        prescription["python"] = f"{prescription['python']}\n# {CHECKPOINT_PRESCRIPTION}".lstrip("\n")
    if final.tracked_modules != asked.tracked_modules and final.tracked_modules is not None:
        prescription["tracked_modules"] = list(final.tracked_modules)
        method = (
            "# in your Task (a coverage change: the scores describe these modules only)\n"
            "def get_influence_tracked_modules(self):\n"
            f"    return {list(final.tracked_modules)!r}"
        )
        prescription["python"] = f"{prescription['python']}\n\n{method}".lstrip("\n")
    return prescription


def advice_for(asked: Any, rejected: list[dict[str, Any]], min_fix_spearman: float) -> list[dict[str, Any]]:
    """The best option the fidelity bar rejected, per cause left untreated, with its measured cost."""
    advice = []
    for option in rejected:
        change = option["change"]
        settings = prescribe(asked.factor_args, asked.score_args, change.factor_args, change.score_args)
        fidelity = option["fidelity"]
        advice.append(
            {
                "cause": option["cause"],
                "rung": option["rung"],
                "change": change.description,
                "factor_args": settings["factor_args"],
                "score_args": settings["score_args"],
                "python": settings["python"],
                "method_changed": change.method_changed,
                "fidelity": {key: fidelity.get(key) for key in FIDELITY_KEYS},
                "reason": f"not applied: its rankings fall below min_fix_spearman {min_fix_spearman:g}",
            }
        )
    return advice


def _plain(value: Any) -> Any:
    return str(value).replace("torch.", "") if isinstance(value, torch.dtype) else value
