"""Built-in demo pipelines: `tiny-lm` (the seeds' failing case), `uci-mlp` and `conv` (healthy)."""

from __future__ import annotations

import importlib

from influence_doctor.errors import UsageError
from influence_doctor.pipeline import Pipeline

DEMOS: dict[str, str] = {
    "tiny-lm": "influence_doctor.demos.tiny_lm:tiny_lm",
    "uci-mlp": "influence_doctor.demos.uci_mlp:uci_mlp",
    "conv": "influence_doctor.demos.conv:conv",
}
DEFAULT_DEMO = "tiny-lm"


def load_demo(name: str) -> Pipeline:
    if name not in DEMOS:
        raise UsageError(f"There is no built-in demo {name!r}; choose one of: {', '.join(DEMOS)}.")
    module_name, attr = DEMOS[name].split(":")
    return getattr(importlib.import_module(module_name), attr)()
