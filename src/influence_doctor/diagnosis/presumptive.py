"""Presumptive diagnosis: root causes named from the findings alone, with no experiment to confirm them.

`inspect` reads kronfluence's files without the model, so nothing can be re-run: each symptom gets the
cause its checks suspect (an inf in a float16 sum is `fp16-overflow`), a symptom downstream of an
earlier inf/NaN or failed stage is explained by it, and every Problem is marked unconfirmed.
"""

from __future__ import annotations

from collections.abc import Iterable

from influence_doctor.causes import cause, presumed
from influence_doctor.diagnosis.problem import Problem, StageView
from influence_doctor.diagnosis.symptoms import PROPAGATING, find_symptoms
from influence_doctor.pipeline import STAGES


def diagnose_findings(stages: Iterable[StageView]) -> list[Problem]:
    """One unconfirmed Problem per symptom, in pipeline order; downstream inf/NaN joins its origin."""
    problems: list[Problem] = []
    for symptom in find_symptoms(stages):
        origin = next(
            (
                p
                for p in problems
                if symptom.kind in PROPAGATING
                and p.symptoms[0].kind in PROPAGATING
                and STAGES.index(p.symptoms[0].stage) < STAGES.index(symptom.stage)
            ),
            None,
        )
        if origin is not None:
            origin.evidence.extend(symptom.findings)
            origin.symptoms.append(symptom)
            continue
        suspected = next((f.cause for f in symptom.findings if f.cause), None) or presumed(symptom.kind, symptom.stage)
        first = symptom.findings[0].message.rstrip(".") if symptom.findings else symptom.measurement
        row = cause(suspected)
        explanation = f": presumably {row.explanation}" if row is not None else ""
        problems.append(
            Problem(
                cause=suspected,
                stage=symptom.stage,
                evidence=list(symptom.findings),
                message=f"{first}{explanation} (not confirmed by an experiment).",
                symptoms=[symptom],
            )
        )
    for problem in problems:
        problem.subjects = sorted({f.subject for f in problem.evidence if f.subject})
    return problems
