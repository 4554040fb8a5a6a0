"""From measured wrong results to root causes.

- `symptoms`: fail findings and stage errors, grouped into what an experiment can measure;
- `differential`: runs those experiments on a subsample and convicts one cause per symptom, its suspects
  taken from the cause table (`influence_doctor.causes`);
- `presumptive`: the same naming without experiments, for `inspect`, which has no model to re-run;
- `problem`: the Problem and Experiment records the report carries.
"""

from influence_doctor.diagnosis.presumptive import diagnose_findings
from influence_doctor.diagnosis.problem import (
    Experiment,
    Problem,
    StageView,
    relabel,
    stage_views,
)

__all__ = [
    "Experiment",
    "Problem",
    "StageView",
    "diagnose_findings",
    "relabel",
    "stage_views",
]
