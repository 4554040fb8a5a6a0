"""What a diagnosis produces: Problems (one root cause each) and the Experiments that convicted them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from influence_doctor import causes
from influence_doctor.findings import Finding, json_number


@dataclass
class Experiment:
    """One counterfactual: a setting changed on a subsample, and what it did to the failing measurement."""

    change: str  # e.g. "covariance dtypes float16 → float32"
    measurement: str  # e.g. "non-finite entries in covariance"
    before: float | str | None
    after: float | str | None
    verdict: str  # e.g. "confirms fp16-overflow", "refutes low-precision-loss"
    examples: int = 0  # training examples of the subsample it ran on
    queries: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "change": self.change,
            "measurement": self.measurement,
            "before": _plain(self.before),
            "after": _plain(self.after),
            "verdict": self.verdict,
            "examples": self.examples,
            "queries": self.queries,
            "seconds": self.seconds,
        }


def _plain(value: float | str | None) -> float | str | None:
    return json_number(value) if isinstance(value, float) else value


@dataclass
class Problem:
    """One root cause, where it starts, the findings it explains and the experiments behind it."""

    cause: str | None
    stage: str
    subjects: list[str] = field(default_factory=list)
    evidence: list[Finding] = field(default_factory=list)
    message: str = ""
    setting: str | None = None  # the dtype group or knob its remedies act on ("covariance", "scores", ...)
    experiments: list[Experiment] = field(default_factory=list)
    confirmed: bool = False  # an experiment changed the failing measurement (or it was measured directly)
    lab: str | None = None  # where it reproduced: "probe" or "rehearsal"; rungs are rehearsed there
    symptoms: list[Any] = field(default_factory=list, repr=False)  # diagnosis.symptoms.Symptom, in order
    revealed_by: str | None = None  # the rung whose re-run uncovered it (a stage that could not run before)

    @property
    def basis(self) -> str:
        """What the verdict rests on: a one-setting experiment, the symptom itself (a NaN weight, a
        diverged loss, an allocator error need no counterfactual), or only the checks' presumption."""
        if not self.confirmed:
            return "presumption"
        return "experiment" if self.experiments else "direct measurement"

    @property
    def treatable(self) -> bool:
        """Whether a factor or score setting can fix it (the remedies' ladders apply): not a broken
        model, and not a failure to build or train the model at all."""
        return causes.treatable(self.cause, self.stage)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cause": self.cause,
            "stage": self.stage,
            "subjects": self.subjects,
            "evidence": sorted({f.check for f in self.evidence}),
            "message": self.message,
            "treatable": self.treatable,
            "confirmed": self.confirmed,
            "basis": self.basis,
            "setting": self.setting,
            "experiments": [experiment.to_dict() for experiment in self.experiments],
            "revealed_by": self.revealed_by,
        }


@dataclass
class StageView:
    """What diagnosis needs of a stage: status, findings, error. Works for a live Run or a report."""

    name: str
    status: str
    findings: list[Finding]
    error: dict[str, str] | None = None


def stage_views(run: Any) -> list[StageView]:
    """The diagnosis inputs of a live Run."""
    return [StageView(r.name, r.status, r.findings, r.error) for r in run.stages.values()]


def relabel(problems: Iterable[Problem]) -> dict[int, str | None]:
    """Map id(finding) → the root cause that explains it: reports label each symptom with its cause."""
    return {id(f): p.cause for p in problems for f in p.evidence}
