"""Differential diagnosis: every symptom's suspects tested by experiments that change one setting.

For each symptom, earliest stage first:
1. a symptom downstream of an already convicted inf/NaN or failed stage is explained by it;
2. causes measured directly (NaN weights, a diverged loss, an allocator failure) need no experiment;
3. otherwise the symptom is reproduced on the probe subsample (or, if it needs more data, on the whole
   rehearsal), and each suspect from the cause table (`causes.py`) is tested in turn; the first whose
   experiments come out as predicted is the cause, and every experiment run is kept as evidence.
A symptom no experiment explains stays a Problem with cause None, and its refuted experiments.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from influence_doctor import distributed
from influence_doctor.causes import RANK_DEFICIENT, Context, Hypothesis, cause, suspects
from influence_doctor.changes import Target
from influence_doctor.checks.precision import agreement_verdict, score_agreement
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.diagnosis.problem import Experiment, Problem, stage_views
from influence_doctor.diagnosis.symptoms import PROPAGATING, Symptom, find_symptoms
from influence_doctor.dtypes import score_path_dtype
from influence_doctor.labs import Lab, Labs
from influence_doctor.pipeline import FACTOR_STAGES, STAGES
from influence_doctor.runner.executor import Trial

TRIAL_KINDS = frozenset(
    {
        "projected",
        "nonfinite",
        "raised",
        "undefined",
        "disagreement",
        "orthogonality",
        "reconstruction",
        "negative",
        "empty",
        "hooks",
        "other",
    }
)
"""Symptom kinds a trial can measure (training, model and memory are measured on the run itself)."""


def reproduce(labs: Labs, symptom: Symptom, thresholds: Thresholds) -> tuple[Lab, Trial, Any] | None:
    """The smallest lab whose trial of the current configuration shows the symptom, with that trial."""
    if not labs.enabled or symptom.kind not in TRIAL_KINDS:
        return None
    candidates = [labs.probe] if symptom.kind in COMPARISONS else [labs.probe, labs.rehearsal]
    for lab in candidates:
        base = lab.configured()
        value, bad = measure(symptom, base, lab, thresholds)
        if bad:
            return lab, base, value
    return None


def measure(symptom: Symptom, trial: Trial, lab: Lab, thresholds: Thresholds) -> tuple[Any, bool]:
    """The symptom's failing measurement in `trial`: (value to report, whether it is still wrong)."""
    stage = symptom.stage
    failure = trial.failure(stage)
    if symptom.kind in ("nonfinite", "raised"):
        if failure:
            return failure, True
        if stage not in trial.artifacts:
            return None, False
        count = trial.nonfinite(stage)
        return float(count), count > 0
    if symptom.kind in ("undefined", "disagreement"):
        if failure:
            return failure, True
        kind = "pairwise" if stage == "pairwise_scores" else "self"
        reference = lab.reference_for(trial)
        if symptom.kind == "undefined":
            missing = reference.failure(stage)
            if missing:
                return missing, True
            mine, expected = trial.scores(kind), reference.scores(kind)
            if mine is None or expected is None:
                return None, False
            count = float(score_agreement(mine, expected)["reference_nonfinite"])
            return count, count > 0
        configured, expected = trial.scores(kind), reference.scores(kind)
        if configured is None or expected is None:
            return None, False
        agreement = score_agreement(configured, expected)
        dtype = score_path_dtype(trial.factor_args, trial.score_args)
        wrong, _ = agreement_verdict(agreement, dtype, thresholds)
        return agreement["median_spearman"], wrong
    if symptom.kind == "reduction":
        return task_contract_measured(lab.run, trial.configuration, thresholds)
    if symptom.kind == "hooks":
        return hooks_measured(lab, trial.configuration, symptom, thresholds)
    if failure:
        return failure, True
    if symptom.kind == "projected":
        return measured_at_full_size(symptom, trial, lab)
    fails = [f for f in _trial_findings(trial, stage, thresholds) if f.check in symptom.checks]
    if not fails:
        return 0.0, False
    values = [f.value for f in fails if isinstance(f.value, float) and not math.isnan(f.value)]
    worst = (min(values) if symptom.kind == "negative" else max(values)) if values else float(len(fails))
    return worst, True


def measured_at_full_size(symptom: Symptom, trial: Trial, lab: Lab) -> tuple[float | str | None, bool]:
    """A projected overflow, measured: the trial's covariance settings accumulated over all the training
    data (one covariance pass, cached per configuration), and the non-finite entries of the symptom's
    subjects. Without a full-size measurement of the run there is nothing to test (a projection alone
    is a warning, never a symptom)."""
    if not lab.run.executor.full_size_counts:  # the run's own overflow was projected, never measured
        return None, False
    count = lab.run.executor.full_size_covariance(trial.configuration)
    if count.error is not None:
        return count.error, True
    nonfinite = count.total({f.subject for f in symptom.findings})
    return float(nonfinite), nonfinite > 0


def task_contract_measured(run: Any, configuration: Any, thresholds: Thresholds) -> tuple[float | str | None, bool]:
    """The Task's contract measured again with the Task as a configuration hands it to kronfluence (made
    a sum, or not): the training loss's ratio to the sum over examples alone on the largest batch, and
    whether it still fails."""
    from influence_doctor.checks.contract import check_task_contract

    record = run.session.contract(configuration)
    if record is None:
        return None, False
    if "error" in record:
        return record["error"], True
    outcome = check_task_contract(record, thresholds)
    probes = [p for p in record["probes"] if p["quantity"] == "train loss" and p.get("alone_sum")]
    ratio = probes[-1]["batch_value"] / probes[-1]["alone_sum"] if probes else None
    return ratio, any(f.severity == "fail" for f in outcome.findings)


def hooks_measured(lab: Lab, configuration: Any, symptom: Symptom, thresholds: Thresholds) -> tuple[float | None, bool]:
    """The hooks audited again under `configuration`: the worst relative error of the symptom's modules, and
    whether any is still beyond its tolerance."""
    from influence_doctor.audit.hooks import audited
    from influence_doctor.checks.hooks import failing_modules

    audit = audited(lab.run, configuration, lab)
    if audit is None or audit.skipped:
        return None, False
    modules = {f.subject for f in symptom.findings}
    wrong = {m: e for m, e in failing_modules(audit, thresholds).items() if m in modules}
    errors = [audit.gradients.get(m, audit.factors.get(m, audit.scores.get(m, math.nan))) for m in modules]
    finite = [e for e in errors if not math.isnan(e)]
    return (max(wrong.values()) if wrong else max(finite, default=math.nan)), bool(wrong)


def _trial_findings(trial: Trial, stage: str, thresholds: Thresholds) -> list:
    from influence_doctor.examine import examine_artifacts

    exams = examine_artifacts(trial.artifacts, trial.factor_args, trial.score_args, thresholds, stages=[stage])
    return [f for f in exams.get(stage).findings if f.severity == "fail"] if stage in exams else []


def trial_symptoms(trial: Trial, lab: Lab, thresholds: Thresholds) -> set[tuple[str, str]]:
    """Every (kind, stage) the trial is wrong in: errors, fail checks and, on the probe, float64 disagreement."""
    from influence_doctor.examine import examine_artifacts

    wrong: set[tuple[str, str]] = {("raised", stage) for stage in trial.errors}
    for stage, exam in examine_artifacts(trial.artifacts, trial.factor_args, trial.score_args, thresholds).items():
        for symptom in find_symptoms([_view(stage, exam.findings)]):
            wrong.add((symptom.kind, symptom.stage))
    if not lab.covers_run:
        for stage in ("pairwise_scores", "self_scores"):
            if stage not in trial.artifacts:
                continue
            for kind in ("undefined", "disagreement"):
                probe = Symptom(kind, stage, ())
                if measure(probe, trial, lab, thresholds)[1]:
                    wrong.add((kind, stage))
    return wrong


def _view(stage: str, findings: list) -> Any:
    from influence_doctor.diagnosis.problem import StageView

    return StageView(stage, "fail", findings)


@dataclass
class Verdict:
    """Whether a change healed a problem on a lab, with the numbers that say so."""

    heals: bool
    before: Any
    after: Any
    reason: str
    revealed: list[tuple[str, str]] = field(default_factory=list)  # (kind, stage) newly measurable and wrong


def judge_change(problem: Problem, base: Trial, trial: Trial, lab: Lab, thresholds: Thresholds) -> Verdict:
    """A change heals when every symptom of the problem is gone from the trial and no measurement that
    passed before it fails after it.

    A stage the base could not compute, or computed from inf/NaN or a failed stage upstream, had no
    passing measurement to break: what goes wrong there now was hidden behind the problem, and is
    returned as `revealed`, to be diagnosed and treated on top of this change.
    """
    symptoms = problem.symptoms or []
    before = [measure(s, base, lab, thresholds)[0] for s in symptoms]
    measured = [measure(s, trial, lab, thresholds) for s in symptoms]
    after = [value for value, _bad in measured]
    still = [s for s, (_value, bad) in zip(symptoms, measured, strict=True) if bad]
    wrong_before = trial_symptoms(base, lab, thresholds)
    new = trial_symptoms(trial, lab, thresholds) - wrong_before
    new -= {(s.kind, s.stage) for s in symptoms}
    broken = sorted(item for item in new if passed_before(item, base, wrong_before))
    revealed = sorted(new - set(broken))
    if still:
        return Verdict(False, _one(before), _one(after), f"{still[0].measurement}: {_show(_one(after))}")
    if broken:
        kind, stage = broken[0]
        return Verdict(
            False, _one(before), _one(after), f"it cleared the problem but broke {stage} ({kind}), which passed before"
        )
    return Verdict(True, _one(before), _one(after), "", revealed)


def passed_before(measurement: tuple[str, str], base: Trial, wrong_before: set[tuple[str, str]]) -> bool:
    """Whether `base` made this measurement (a symptom kind at a stage) and it passed: the stage was
    computed from finite inputs (no inf/NaN or error in it or in a factor stage feeding it; the two score
    stages do not feed each other) and the measurement found nothing. Judged per measurement, not per
    stage: a covariance rung that clears the covariance's precision loss and overflows it breaks a
    measurement that passed before, although the covariance had a symptom."""
    kind, stage = measurement
    if stage not in base.artifacts or base.failure(stage):
        return False
    feeding = {name for name in FACTOR_STAGES if STAGES.index(name) < STAGES.index(stage)} | {stage}
    garbage_in = any(k in PROPAGATING and wrong_stage in feeding for k, wrong_stage in wrong_before)
    return not garbage_in and (kind, stage) not in wrong_before


def _one(values: list[Any]) -> Any:
    return values[0] if len(values) == 1 else values


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --- the diagnosis ----------------------------------------------------------------------------------


def differential_diagnosis(run: Any, labs: Labs | None, thresholds: Thresholds | None = None) -> list[Problem]:
    """Root causes of every measured wrong result of `run`, each convicted by an experiment."""
    thresholds = thresholds or Thresholds()
    views = stage_views(run)
    context = Context(
        factor_args=run.factor_args,
        score_args=run.score_args,
        score_stage="pairwise_scores" if "pairwise" in run.pipeline.scores else "self_scores",
        rank_deficient=any(f.cause == RANK_DEFICIENT.tag for view in views for f in view.findings),
    )
    problems: list[Problem] = []
    for symptom in find_symptoms(views):
        upstream = _explained_upstream(problems, symptom)
        if upstream is not None:
            upstream.evidence.extend(symptom.findings)
            upstream.symptoms.append(symptom)
            continue
        found = investigate(symptom, context, labs, thresholds)
        same = next((p for p in problems if found.cause and _same_problem(p, found)), None)
        if same is None:
            problems.append(found)
        else:  # e.g. pairwise and self scores both off for one precision setting: one problem
            same.evidence.extend(found.evidence)
            same.symptoms.extend(found.symptoms)
            same.experiments.extend(found.experiments)
    for problem in problems:
        problem.subjects = sorted({f.subject for f in problem.evidence if f.subject})
    return distributed.decide(problems)  # under torchrun: rank 0's diagnosis on every rank


COMPARISONS = frozenset({"undefined", "disagreement"})
"""Symptoms measured against float64 on the probe."""


def _same_problem(first: Problem, second: Problem) -> bool:
    """One cause acting through one setting is one problem, wherever it shows (pairwise and self scores)."""
    if (first.cause, first.setting) != (second.cause, second.setting):
        return False
    return first.setting is not None or first.stage == second.stage


def _explained_upstream(problems: Iterable[Problem], symptom: Symptom) -> Problem | None:
    """inf/NaN or a failed stage flows downstream: a later stage fed by it fails in turn; and a broken
    model (NaN weights, a diverged loss) explains every failure computed from it."""
    for problem in problems:
        origin = problem.symptoms[0] if problem.symptoms else None
        if origin is None:
            continue
        row = cause(problem.cause)
        if row is not None and row.explains_downstream and origin.stage == "train":
            return problem
        if (
            symptom.kind in PROPAGATING
            and origin.kind in PROPAGATING
            and STAGES.index(origin.stage) < STAGES.index(symptom.stage)
        ):
            return problem
        if (  # the probe's comparisons of scores the run could not compute add nothing to that failure
            symptom.kind in COMPARISONS
            and origin.kind in PROPAGATING
            and STAGES.index(origin.stage) <= STAGES.index(symptom.stage)
        ):
            return problem
    return None


def investigate(symptom: Symptom, context: Context, labs: Labs | None, thresholds: Thresholds) -> Problem:
    """Test the symptom's suspects in table order; the first confirmed hypothesis names the cause."""
    rules = suspects(symptom.kind)
    for rule in rules:
        for hypothesis in rule.hypotheses_for(symptom, context):
            if not hypothesis.steps:  # measured directly: the symptom is the proof
                lab = "probe" if symptom.kind == "hooks" and labs is not None and labs.enabled else None
                return _problem(hypothesis, symptom, [], confirmed=True, lab=lab)
    located = reproduce(labs, symptom, thresholds) if labs is not None else None
    if located is None:  # nothing to experiment on: the checks' suspicion, said to be unconfirmed
        presumed = next((f.cause for f in symptom.findings if f.cause), None)
        why = (
            "the probes are off, so no experiment tested it"
            if labs is None or not labs.enabled
            else "it did not reproduce on a subsample, so no experiment could test it"
        )
        return Problem(
            cause=presumed,
            stage=symptom.stage,
            evidence=list(symptom.findings),
            message=f"{_symptom_text(symptom)}; presumably {presumed or 'an unknown cause'}, but {why}.",
            symptoms=[symptom],
        )
    lab, base, before = located
    experiments: list[Experiment] = []
    for rule in rules:
        for hypothesis in rule.hypotheses_for(symptom, context):
            labs.note(f"testing {hypothesis.cause} at {hypothesis.stage} on {lab.examples} examples")
            if _test(hypothesis, symptom, lab, base, before, experiments, thresholds):
                return _problem(hypothesis, symptom, experiments, confirmed=True, lab=lab.name)
    return Problem(
        cause=None,
        stage=symptom.stage,
        evidence=list(symptom.findings),
        message=f"{_symptom_text(symptom)}; no single-setting experiment changed it"
        + (f" ({len(experiments)} tried, all refuted)." if experiments else "."),
        experiments=experiments,
        lab=lab.name,
        symptoms=[symptom],
    )


def _test(
    hypothesis: Hypothesis,
    symptom: Symptom,
    lab: Lab,
    base: Trial,
    before: Any,
    experiments: list[Experiment],
    thresholds: Thresholds,
) -> bool:
    """Run the hypothesis's experiments in order; True when every one comes out as predicted."""
    target = Target(hypothesis.stage, hypothesis.setting, frozenset(f.stage for f in symptom.findings))
    for index, (change_id, expected) in enumerate(hypothesis.steps, start=1):
        trial, change = lab.counterfactual(base, change_id, target)
        if trial is None:  # the change cannot act here (nothing to raise): no experiment, not confirmed
            return False
        after, bad = measure(symptom, trial, lab, thresholds)
        as_predicted = bad if expected == "persists" else not bad
        last = index == len(hypothesis.steps)
        verdict = ("confirms" if last else "consistent with") if as_predicted else "refutes"
        experiments.append(
            Experiment(
                change=change,
                measurement=symptom.measurement,
                before=before,
                after=after,
                verdict=f"{verdict} {hypothesis.cause}",
                examples=lab.run.train_examples_total if symptom.kind == "projected" else lab.examples,
                queries=lab.queries,
                seconds=trial.seconds,
            )
        )
        if not as_predicted:
            return False
    return True


def _problem(
    hypothesis: Hypothesis, symptom: Symptom, experiments: list[Experiment], confirmed: bool, lab: str | None
) -> Problem:
    return Problem(
        cause=hypothesis.cause,
        stage=hypothesis.stage,
        evidence=list(symptom.findings),
        message=_message(hypothesis, symptom, experiments),
        setting=hypothesis.setting,
        experiments=experiments,
        confirmed=confirmed,
        lab=lab,
        symptoms=[symptom],
    )


def _symptom_text(symptom: Symptom) -> str:
    first = symptom.findings[0].message if symptom.findings else symptom.measurement
    return first.rstrip(".")


def _message(hypothesis: Hypothesis, symptom: Symptom, experiments: list[Experiment]) -> str:
    """The symptom as the check saw it, the cause when it says more than the check did, and the
    experiment that convicted it, in numbers."""
    row = cause(hypothesis.cause)
    text = _symptom_text(symptom)
    if all(f.cause != row.tag for f in symptom.findings):
        text += f" ({row.tag}: {row.explanation})"
    if row.advice:
        return f"{text}. {row.advice}"
    if row.note:
        text += f" ({row.note})"
    confirming = [e for e in experiments if e.verdict.startswith("confirms")]
    if confirming:
        last = confirming[-1]
        text += f"; confirmed on {last.examples} examples: with {last.change} it went from {_show(last.before)} to "
        text += _show(last.after)
    return text + "."
