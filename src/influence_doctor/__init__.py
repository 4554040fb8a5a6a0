"""influence-doctor: run kronfluence pipelines instrumented, find what breaks them, and say why."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from influence_doctor.pipeline import STAGES, Pipeline, TrainingMonitor
from influence_doctor.version import __version__

if TYPE_CHECKING:
    from influence_doctor.doctor import Report, diagnose

__all__ = ["STAGES", "Pipeline", "Report", "TrainingMonitor", "__version__", "diagnose"]


def __getattr__(name: str) -> Any:
    # The doctor pulls in torch and kronfluence: import it only when it is asked for.
    if name in ("diagnose", "Report"):
        from influence_doctor import doctor

        return getattr(doctor, name)
    raise AttributeError(f"module 'influence_doctor' has no attribute {name!r}")
