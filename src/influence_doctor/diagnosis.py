"""From symptoms to root causes: rules that turn fail findings and stage errors into Problems.

A symptom downstream of a cause is not a problem of its own: an eigh failure on an fp16 covariance
that holds inf is the covariance's `fp16-overflow`; inf scores from a NaN model are `nonfinite-model`.
Rules run in pipeline order, so the earliest cause claims the symptoms that follow from it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from influence_doctor.findings import Finding
from influence_doctor.pipeline import STAGES

UNTREATABLE = frozenset({"nonfinite-model", "training-diverged", "training-oscillating"})
"""Causes no factor setting can fix: the model itself must be retrained."""

TRAINING_ADVICE = (
    "lower the learning rate 2-5x, add a warmup, clip gradients (e.g. max norm 1.0), and watch the "
    "validation loss; then re-run the doctor on the retrained model."
)

EXPLANATIONS: dict[str, str] = {
    "fp16-overflow": "a float16 sum or product passed 65504 and became inf",
    "low-precision-loss": "the configured precision loses accuracy measurably against float64",
    "dtype-drift": "results computed in high precision were stored in a lower one",
    "ill-conditioned": "the damped curvature spans more orders of magnitude than the precision resolves",
    "rank-deficient": "the factor is singular: its inputs span fewer directions than its size",
    "asymmetric": "a covariance that must be symmetric is not",
    "not-psd": "a quantity that must be positive semidefinite has negative values",
    "eigendecomposition-failed": "the eigendecomposition failed on a valid-looking covariance",
    "eigendecomposition-inaccurate": "the eigendecomposition does not reproduce its covariance",
    "tiny-damping": "the damping is too small to matter in floating point",
    "score-outliers": "a few scores dwarf all others",
    "nonfinite-model": "the model or its data produce inf/NaN",
    "training-diverged": "training blew up",
    "training-oscillating": "training oscillates instead of converging",
    "out-of-memory": "a stage ran out of memory",
}


@dataclass
class Problem:
    """One root cause, where it starts, and the findings it explains."""

    cause: str | None
    stage: str
    subjects: list[str] = field(default_factory=list)
    evidence: list[Finding] = field(default_factory=list)
    message: str = ""

    @property
    def treatable(self) -> bool:
        """Whether a factor or score setting can fix it (the remedies' ladders apply): not a broken
        model, and not a failure to build or train the model at all."""
        return self.cause not in UNTREATABLE and self.stage != "train"

    def to_dict(self) -> dict[str, Any]:
        return {
            "cause": self.cause,
            "stage": self.stage,
            "subjects": self.subjects,
            "evidence": sorted({f.check for f in self.evidence}),
            "message": self.message,
            "treatable": self.treatable,
        }


@dataclass
class StageView:
    """What diagnosis needs of a stage: status, findings, error. Works for a live Run or a report."""

    name: str
    status: str
    findings: list[Finding]
    error: dict[str, str] | None = None


def diagnose_findings(stages: Iterable[StageView]) -> list[Problem]:
    """Root causes in pipeline order; every fail finding and stage error is explained by one Problem."""
    views = {view.name: view for view in stages}
    fails = [f for name in STAGES if name in views for f in views[name].findings if f.severity == "fail"]
    warns = [f for name in STAGES if name in views for f in views[name].findings if f.severity == "warn"]
    infos = [f for name in STAGES if name in views for f in views[name].findings if f.severity == "info"]
    problems: list[Problem] = []
    unexplained = list(fails)

    def claim(cause: str | None, stage: str, evidence: list[Finding], message: str) -> Problem:
        problem = Problem(cause, stage, sorted({f.subject for f in evidence if f.subject}), evidence, message)
        problems.append(problem)
        for finding in evidence:
            if finding in unexplained:
                unexplained.remove(finding)
        return problem

    def by_cause(*causes: str, pool: list[Finding] | None = None) -> list[Finding]:
        return [f for f in (unexplained if pool is None else pool) if f.cause in causes]

    # 1. A broken model explains every non-finite number downstream of it.
    broken = by_cause("nonfinite-model", "training-diverged")
    if broken:
        root = (
            "nonfinite-model"
            if any(f.cause == "nonfinite-model" and f.stage == "train" for f in broken)
            else ("training-diverged" if any(f.stage == "train" for f in broken) else "nonfinite-model")
        )
        downstream = [f for f in unexplained if f.stage != "train" and f.check.endswith((".finite", ".raised"))]
        claim(
            root,
            "train" if any(f.stage == "train" for f in broken) else broken[0].stage,
            broken + downstream,
            f"The model is broken ({EXPLANATIONS[root]}): influence of a broken model is meaningless; "
            + TRAINING_ADVICE,
        )
    oscillating = by_cause("training-oscillating")
    if oscillating:
        claim(
            "training-oscillating",
            "train",
            oscillating,
            f"Training oscillates instead of converging: {TRAINING_ADVICE}",
        )

    # 2. Overflow in a narrow dtype explains the non-finite and failed results after it.
    overflow = by_cause("fp16-overflow")
    if overflow:
        first_stage = min((f.stage for f in overflow), key=STAGES.index)
        later = [
            f
            for f in unexplained
            if STAGES.index(f.stage) >= STAGES.index(first_stage)
            and (f.check.endswith((".finite", ".raised")) or f.cause in ("eigendecomposition-failed", "score-outliers"))
        ]
        subjects = sorted({f.subject for f in overflow if f.stage == first_stage}) or ["?"]
        claim(
            "fp16-overflow",
            first_stage,
            overflow + later,
            f"{first_stage} overflowed in float16 in {len(subjects)} place(s), e.g. {subjects[0]}: "
            "every inf/NaN and failure after it follows from that overflow.",
        )

    # 3. Stage errors with no upstream cause.
    for name in STAGES:
        view = views.get(name)
        if view is None or view.status != "error":
            continue
        raised = [f for f in unexplained if f.stage == name and f.check == f"{name}.raised"]
        if not raised:
            continue
        error = view.error or {}
        text = f"{error.get('type', '')} {error.get('message', '')}".lower()
        if "out of memory" in text or "outofmemory" in text:
            claim("out-of-memory", name, raised, f"The {name} stage ran out of memory.")
        elif name == "eigendecomposition":
            claim(
                "eigendecomposition-failed",
                name,
                raised,
                "linalg.eigh failed on finite covariances: they are too ill-conditioned or degenerate for "
                "the eigendecomposition dtype.",
            )
        else:
            claim(None, name, raised, f"The {name} stage raised an error no rule explains: {error.get('message', '')}")

    # 4. Precision problems of the factors.
    for cause, stage, text in (
        ("eigendecomposition-failed", "eigendecomposition", "The eigendecomposition returned inf/NaN."),
        (
            "dtype-drift",
            "eigendecomposition",
            "Eigenvectors are stored in a coarser dtype than they were computed in and than preconditioning needs.",
        ),
        (
            "eigendecomposition-inaccurate",
            "eigendecomposition",
            "The stored eigenpairs do not reproduce the covariance.",
        ),
        (
            "low-precision-loss",
            "covariance",
            "The configured precision measurably changes factors or scores against float64.",
        ),
        ("asymmetric", "covariance", "Covariances that must be symmetric are not."),
        ("not-psd", "covariance", "Curvature that must be positive semidefinite has negative values."),
    ):
        evidence = by_cause(cause)
        if evidence:
            claim(
                cause,
                min((f.stage for f in evidence), key=STAGES.index) if cause != "dtype-drift" else stage,
                evidence,
                text,
            )

    # 5. Conditioning: a singular factor or a damping too small to count, seen as huge scores.
    conditioning = by_cause("ill-conditioned", "tiny-damping")
    outliers = by_cause("score-outliers")
    nonfinite_scores = [f for f in unexplained if f.check == "scores.finite"]
    score_symptoms = outliers + nonfinite_scores
    if conditioning or score_symptoms:
        rank_evidence = by_cause("rank-deficient", pool=warns)
        below_floor = [f for f in infos if f.cause == "tiny-damping"]
        tiny = any(f.cause == "tiny-damping" for f in conditioning) or (bool(below_floor) and bool(score_symptoms))
        score_stage = next((n for n in ("pairwise_scores", "self_scores") if n in views), "pairwise_scores")
        if rank_evidence and conditioning:
            claim(
                "rank-deficient",
                "covariance",
                rank_evidence + conditioning + score_symptoms,
                f"{len({f.subject for f in rank_evidence})} factor(s) are singular (their inputs span fewer "
                "directions than their size) and the damping does not make up for it.",
            )
        elif tiny or (score_symptoms and not conditioning):
            claim(
                "tiny-damping" if tiny or nonfinite_scores else "score-outliers",
                score_stage,
                conditioning + score_symptoms + (below_floor if tiny else []),
                "The damping is too small to bound (Λ+δ)⁻¹: directions with almost no curvature blow up the scores."
                if tiny or nonfinite_scores
                else "A few scores dwarf all others.",
            )
        else:
            claim(
                "ill-conditioned",
                conditioning[0].stage,
                conditioning + score_symptoms,
                "The damped curvature is too ill-conditioned for the preconditioning precision.",
            )

    # 6. Whatever no rule explains is still a problem, named by the check that failed.
    for finding in list(unexplained):
        claim(finding.cause, finding.stage, [finding], finding.message)
    return problems


def stage_views(run: Any) -> list[StageView]:
    """The diagnosis inputs of a live Run."""
    return [StageView(r.name, r.status, r.findings, r.error) for r in run.stages.values()]


def relabel(problems: list[Problem]) -> dict[int, str | None]:
    """Map id(finding) → the root cause that explains it: reports label each symptom with its cause."""
    return {id(f): p.cause for p in problems for f in p.evidence}
