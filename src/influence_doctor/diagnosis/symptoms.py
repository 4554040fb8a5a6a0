"""Symptoms: the measured wrong results (fail findings and stage errors), grouped by what they are.

A symptom is what an experiment measures before and after changing one setting: inf/NaN in a stage's
output, a stage that raised, scores that disagree with float64, eigenvectors that are not orthonormal.
Pure: findings in, symptoms out, in pipeline order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from influence_doctor.diagnosis.problem import StageView
from influence_doctor.findings import Finding
from influence_doctor.pipeline import STAGES

OUT_OF_MEMORY = re.compile(
    r"out of memory|outofmemory|memoryerror|can't allocate memory|cannot allocate memory|"
    r"not enough memory|failed to allocate|std::bad_alloc",
    re.IGNORECASE,
)
"""Allocator failures on GPU (CUDA OOM) and CPU (MemoryError, DefaultCPUAllocator, bad_alloc)."""

KIND_OF_CHECK: dict[str, str] = {
    "covariance.finite": "nonfinite",
    "eigendecomposition.finite": "nonfinite",
    "lambda.finite": "nonfinite",
    "scores.finite": "nonfinite",
    "scores.reference_finite": "undefined",
    "scores.precision": "disagreement",
    "eigendecomposition.orthogonality": "orthogonality",
    "eigendecomposition.stored_dtype": "orthogonality",
    "eigendecomposition.reconstruction": "reconstruction",
    "covariance.diagonal": "negative",
    "eigendecomposition.psd": "negative",
    "lambda.nonnegative": "negative",
    "scores.self_nonnegative": "negative",
    "covariance.examples": "empty",
    "covariance.full_size_overflow": "projected",
    "lambda.full_size_overflow": "projected",
    "scores.full_size_overflow": "projected",
    "hooks.gradients": "hooks",
    "hooks.factors": "hooks",
    "hooks.scores": "hooks",
}
"""Fail checks → symptom kind. Training fails are `training`, stage errors `raised` (or `oom`)."""

TASK_CHECKS: dict[str, str] = {
    "task.loss_reduction": "reduction",
    "task.batch_independence": "reduction",
    "task.examples_finite": "examples",
    "preflight.memory": "preflight",
    "preflight.solver_limit": "preflight",
    "preflight.unsupported_modules": "unsupported",
    "train.parameters_finite": "model",
}
"""The Task's contract, measured in the train stage: symptoms of their own, apart from the curve."""

PROPAGATING = frozenset({"nonfinite", "raised"})
"""Kinds that flow downstream: a stage fed inf/NaN or nothing fails in turn."""

MEASUREMENTS: dict[str, str] = {
    "model": "non-finite parameters",
    "training": "the training curve",
    "reduction": "the Task's loss of a batch against the sum over its examples alone",
    "examples": "examples whose loss alone is inf/NaN",
    "preflight": "bytes a module's eigendecomposition needs against the memory budget",
    "unsupported": "modules kronfluence's default tracking cannot wrap",
    "nonfinite": "non-finite entries in {stage}",
    "raised": "{stage} raised",
    "undefined": "non-finite {stage} in float64 at the same damping",
    "disagreement": "median per-query Spearman of {stage} vs float64",
    "orthogonality": "worst ‖QᵀQ−I‖ of the stored eigenvectors",
    "reconstruction": "worst ‖QΛQᵀ−C‖/‖C‖",
    "negative": "{stage} values below zero beyond rounding",
    "projected": "non-finite entries in {stage} accumulated over all the training data",
    "empty": "modules that saw no examples",
    "oom": "{stage} ran out of memory",
    "hooks": "worst relative error of a module's hooks against autograd",
    "other": "failing checks in {stage}",
}


@dataclass(frozen=True)
class Symptom:
    kind: str
    stage: str
    findings: tuple[Finding, ...]
    error: str = ""  # the stage's exception, for `raised` and `oom`

    @property
    def checks(self) -> frozenset[str]:
        return frozenset(f.check for f in self.findings)

    @property
    def measurement(self) -> str:
        return MEASUREMENTS[self.kind].format(stage=self.stage.replace("_", " "))


def find_symptoms(views: Iterable[StageView]) -> list[Symptom]:
    """Every fail finding and stage error, grouped by (kind, stage), earliest stage first."""
    grouped: dict[tuple[str, str], list[Finding]] = {}
    errors: dict[str, str] = {}
    for view in views:
        for finding in view.findings:
            if finding.severity != "fail":
                continue
            kind = _kind(finding, view)
            grouped.setdefault((kind, view.name), []).append(finding)
            if kind in ("raised", "oom") and view.error:
                errors[view.name] = f"{view.error.get('type', '')}: {view.error.get('message', '')}"
    order = {kind: index for index, kind in enumerate(MEASUREMENTS)}
    keys = sorted(grouped, key=lambda key: (STAGES.index(key[1]), order[key[0]]))
    return [Symptom(kind, stage, tuple(grouped[(kind, stage)]), errors.get(stage, "")) for kind, stage in keys]


def _kind(finding: Finding, view: StageView) -> str:
    if finding.check.endswith(".raised"):
        text = f"{(view.error or {}).get('type', '')} {(view.error or {}).get('message', '')}"
        return "oom" if OUT_OF_MEMORY.search(text) else "raised"
    if finding.check in TASK_CHECKS:
        return TASK_CHECKS[finding.check]
    if finding.stage == "train":
        return "training"
    return KIND_OF_CHECK.get(finding.check, "other")
