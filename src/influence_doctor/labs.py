"""Where experiments run: the probe subsample, the whole rehearsal, and the subsample a fix is measured on.

A `Lab` is one scope of the executor as the diagnosis uses it: trials of configurations on a fixed
subsample of the rehearsal — the first `examples` training examples and the first `queries` queries —
from the same trained model, with the same seeds for every trial, so that the only difference between
two trials is the setting a change changed. The lab that covers the whole rehearsal shares its trials
with the run itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from influence_doctor import changes
from influence_doctor.configuration import Configuration
from influence_doctor.runner.executor import Scope, Trial

PROBE_QUERIES = None
"""Queries in the probe subsample: the rehearsal's own (16 by default), so that the probe and the
rehearsal differ only in training examples, which is what the time and headroom fits need."""

DEFAULT_FIDELITY_EXAMPLES = 64
"""Training examples a fix's fidelity is measured on when the probes are off (the probe's default size)."""


class Lab:
    """Trials of configurations on one subsample of the run's rehearsal."""

    def __init__(self, run: Any, scope: Scope) -> None:
        self.run = run
        self.scope = scope
        self.name, self.examples, self.queries = scope.name, scope.examples, scope.queries

    @classmethod
    def at(cls, run: Any, name: str, examples: int | None = None, queries: int | None = None) -> Lab:
        return cls(run, run.executor.scope(name, examples, queries))

    @property
    def seconds(self) -> float:
        return self.run.executor.seconds(self.scope)

    @property
    def covers_run(self) -> bool:
        """Whether this lab's subsample is the whole rehearsal (its trials measure the run's own data)."""
        rehearsal = self.run.rehearsal
        return rehearsal is not None and self.scope.key == rehearsal.key

    def trial(self, configuration: Configuration, kinds: tuple[str, ...] | None = None, label: str = "") -> Trial:
        return self.run.executor.trial(configuration, self.scope, kinds, label=label)

    def configured(self) -> Trial:
        """The run's current configuration (a covariance shift a remedy applied included)."""
        return self.trial(self.run.configuration, label="as configured")

    def measured(self, configuration: Configuration) -> Trial | None:
        """The trial if it already ran; never runs anything."""
        return self.run.executor.cached(configuration, self.scope)

    def reference(self) -> Trial:
        """Every dtype float64, the same damping: the counterfactual of precision for the run's settings."""
        return self.trial(float64(self.run.configuration), label="float64 end to end, same damping")

    def reference_for(self, trial: Trial) -> Trial:
        """The same trial in float64 end to end (same damping, same shift, same Task)."""
        return self.trial(float64(trial.configuration), trial.kinds, label="float64 end to end, same damping")

    def counterfactual(
        self, base: Trial, change_id: str, target: Any, kinds: tuple[str, ...] | None = None
    ) -> tuple[Trial | None, str]:
        """`base`'s configuration with one change of the vocabulary applied, run here (for the score `kinds`,
        default all); (None, why) when the change cannot act on `target`. Everything the change leaves
        alone stays as in `base`, its covariance shift and per-module damping included."""
        facts = changes.Facts.measured(base.configuration, base.artifacts, self.run.session.kinds)
        change, why = changes.plan(change_id, target, base.configuration, facts)
        if change is None:
            return None, why
        return self.trial(change.after, kinds, label=change.description), change.description


def as_asked(asked: Configuration, final: Configuration) -> Configuration:
    """`asked` in `final`'s form: its Task, its checkpointing and its tracked modules (none of them a change
    of what is computed, but what makes the asked configuration computable), through the changes."""
    form = asked
    if final.summed_task and not form.summed_task:
        form = changes.apply("task:sum", form)
    if final.recompute != form.recompute:
        form = changes.apply(f"checkpoint:{final.recompute}", form)
    if final.tracked_modules != form.tracked_modules and final.tracked_modules is not None:
        form = changes.apply(f"track:{','.join(final.tracked_modules)}", form)
    return form


def float64(configuration: Configuration) -> Configuration:
    """The same configuration in float64 end to end and without autocast (damping, shift and task kept)."""
    return changes.apply(changes.FLOAT64, configuration)


class Labs:
    """Where experiments run: the probe subsample first, the whole rehearsal when the probe is too small
    to show the symptom (an fp16 sum that overflows only with all the examples)."""

    def __init__(
        self,
        run: Any,
        probe_examples: int,
        note: Callable[[str], None] | None = None,
        probe: Lab | None = None,
    ) -> None:
        self.run = run
        self.note = note or (lambda text: None)  # progress lines, one per experiment
        ready = run.session.ready
        if probe is not None:  # the pilot that sized the rehearsal: same examples, trials already run
            self.probe: Lab | None = probe
        else:
            self.probe = Lab.at(run, "probe", probe_examples, PROBE_QUERIES) if ready and probe_examples > 0 else None
        self.rehearsal = Lab.at(run, "rehearsal") if ready else None
        self._fidelity: Lab | None = None

    @property
    def enabled(self) -> bool:
        return self.probe is not None

    def named(self, name: str | None) -> Lab | None:
        return self.probe if name == "probe" else self.rehearsal if name == "rehearsal" else None

    @property
    def seconds(self) -> float:
        return self.run.executor.seconds()

    def fidelity_lab(self) -> Lab | None:
        """Where a fix's rankings are measured against the reference: the probe, or with the probes off a
        subsample of the probe's default size, made only when a fix needs measuring."""
        if self.probe is not None:
            return self.probe
        if self._fidelity is None and self.run.session.ready:
            self._fidelity = Lab.at(self.run, "fidelity", DEFAULT_FIDELITY_EXAMPLES, PROBE_QUERIES)
        return self._fidelity

    def reference(self, final: Configuration) -> Trial | None:
        """The reference that always exists: float64 end to end of the configuration as the user gave it
        (same strategy and damping; no remedy), on the fidelity lab, in the form `final` runs the model and
        the Task (a batch mean made the sum the user meant, checkpoints made non-reentrant, the modules it
        can track): what the user asked for, computed where it can be computed."""
        lab = self.fidelity_lab()
        if lab is None:
            return None
        return lab.trial(float64(as_asked(self.run.asked, final)), label="float64 as configured")

    def candidate(self, configuration: Configuration) -> Trial | None:
        """A configuration (a rung on top of the current one, or the final one) on the fidelity lab."""
        lab = self.fidelity_lab()
        return None if lab is None else lab.trial(configuration, label="candidate")
