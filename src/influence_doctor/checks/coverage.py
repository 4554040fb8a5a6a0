"""What kronfluence will see of the model: the check that runs before any factor is fitted.

kronfluence tracks only `nn.Linear` and `nn.Conv2d` modules. Parameters anywhere else — a Hugging Face
`Conv1D` (GPT-2's attention and MLP projections), embeddings, norms, a parameter a module uses directly —
get no factors and contribute nothing to any score, silently. A tracked module that forward never calls
contributes nothing either. These are facts about what the scores mean, not numerics: `warn` at most.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from influence_doctor.causes import FROZEN_TRACKED, UNSUPPORTED_MODULE, UNTRACKED_MODULES
from influence_doctor.checks.outcome import CheckOutcome
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.findings import fail, info, warn

REPLACEABLE: dict[str, str] = {
    "Conv1D": "replace each Conv1D by an equivalent nn.Linear (weight transposed), as kronfluence's docs recommend",
    "Conv1d": "express it as an nn.Conv2d with a height of 1, or an nn.Linear over unfolded windows",
    "ConvTranspose2d": "express it as an nn.Conv2d on the upsampled input",
    "MultiheadAttention": "use separate nn.Linear projections for queries, keys, values and output",
}
"""Untracked module types whose parameters a tracked module could carry instead, with the one-line fix."""


@dataclass
class CoverageFacts:
    """Trainable parameters as kronfluence will see them (each parameter counted once)."""

    trainable: int = 0
    tracked: int = 0
    untracked_by_type: dict[str, dict[str, int]] = field(default_factory=dict)  # type → modules, parameters
    outside_leaf_modules: dict[str, int] = field(default_factory=dict)  # owning module → parameters
    tracked_modules: list[str] = field(default_factory=list)
    never_called: list[str] = field(default_factory=list)
    forward_error: str | None = None  # why the forward pass that finds never-called modules failed

    @property
    def tracked_share(self) -> float:
        return self.tracked / self.trainable if self.trainable else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tracked_share": self.tracked_share}


def coverage_facts(
    model: Any,
    called: Iterable[str] | None = None,
    forward_error: str | None = None,
    trainable: set[int] | None = None,
) -> CoverageFacts:
    """Count a kronfluence-prepared model's trainable parameters by who owns them.

    `called` is the set of tracked-module names a forward pass reached (None: not measured);
    `trainable` the ids of the parameters that required gradients before kronfluence prepared the
    model (it switches them all off); None counts every parameter.
    """

    def counts(parameter: Any) -> bool:
        return trainable is None or id(parameter) in trainable

    from kronfluence.module.tracked_module import TrackedModule

    facts = CoverageFacts(forward_error=forward_error)
    seen: set[int] = set()
    inside_tracked: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, TrackedModule):
            facts.tracked_modules.append(name)
            for parameter in module.original_module.parameters():
                inside_tracked.add(id(parameter))
    for name, module in model.named_modules():
        if isinstance(module, TrackedModule) or any(id(p) in inside_tracked for p in module.parameters(recurse=False)):
            continue
        own = [p for p in module.parameters(recurse=False) if counts(p) and id(p) not in seen]
        if not own:
            continue
        count = sum(p.numel() for p in own)
        seen.update(id(p) for p in own)
        if any(True for _ in module.children()):
            facts.outside_leaf_modules[name or "(the model itself)"] = count
        else:
            kind = type(module).__name__
            entry = facts.untracked_by_type.setdefault(kind, {"modules": 0, "parameters": 0})
            entry["modules"] += 1
            entry["parameters"] += count
    tracked_params = {id(p): p for p in model.parameters() if id(p) in inside_tracked and counts(p)}
    facts.tracked = sum(p.numel() for p in tracked_params.values())
    facts.trainable = facts.tracked + sum(e["parameters"] for e in facts.untracked_by_type.values())
    facts.trainable += sum(facts.outside_leaf_modules.values())
    if called is not None:
        reached = set(called)
        facts.never_called = [name for name in facts.tracked_modules if name not in reached]
    return facts


def check_coverage(facts: CoverageFacts | Mapping[str, Any], thresholds: Thresholds) -> CheckOutcome:
    """`train.coverage` (warn, `untracked-modules`) when parameters a tracked module could carry are
    untracked, or when the tracked share is below `min_tracked_share`; `train.coverage_never_called`
    (warn) for tracked modules forward never reaches; an `info` summary always."""
    if isinstance(facts, Mapping):
        facts = CoverageFacts(**{k: v for k, v in facts.items() if k != "tracked_share"})
    outcome = CheckOutcome(metrics={"coverage": facts.to_dict()})
    share = facts.tracked_share
    replaceable = {k: v for k, v in facts.untracked_by_type.items() if k in REPLACEABLE}
    invisible = facts.trainable - facts.tracked
    if replaceable or share < thresholds.preflight.min_tracked_share:
        kind, entry = max(
            (replaceable or facts.untracked_by_type or {"parameters used directly": {"parameters": invisible}}).items(),
            key=lambda item: item[1]["parameters"],
        )
        fix = REPLACEABLE.get(kind, "track them with supported modules, or accept that the scores ignore them")
        where = f"{entry.get('modules', 0)} {kind} modules" if "modules" in entry else kind
        outcome.findings.append(
            warn(
                "train.coverage",
                f"{1 - share:.0%} of the trainable parameters ({invisible:,}; {where} hold "
                f"{entry['parameters']:,}) are invisible to kronfluence, which tracks only nn.Linear and "
                f"nn.Conv2d: {fix}.",
                subject=kind,
                value=share,
                limit=thresholds.preflight.min_tracked_share,
                cause=UNTRACKED_MODULES,
            )
        )
    if facts.never_called:
        outcome.findings.append(
            warn(
                "train.coverage_never_called",
                f"{len(facts.never_called)} tracked module(s) never ran in a forward pass (e.g. "
                f"{facts.never_called[0]}): their factors stay empty; leave them out of the Task's tracked modules.",
                subject=facts.never_called[0],
                value=float(len(facts.never_called)),
                limit=0.0,
                cause=UNTRACKED_MODULES,
            )
        )
    untracked = ", ".join(f"{k} ×{v['modules']} ({v['parameters']:,})" for k, v in facts.untracked_by_type.items())
    outcome.findings.append(
        info(
            "train.coverage_summary",
            f"kronfluence tracks {len(facts.tracked_modules)} modules holding {share:.0%} of the "
            f"{facts.trainable:,} trainable parameters"
            + (f"; untracked: {untracked}" if untracked else "")
            + (
                f"; used outside any leaf module: {sum(facts.outside_leaf_modules.values()):,}"
                if facts.outside_leaf_modules
                else ""
            )
            + ".",
            value=share,
        )
    )
    return outcome


def check_unsupported(record: Mapping[str, Any]) -> CheckOutcome:
    """`preflight.unsupported_modules` (fail, `unsupported-module`): modules kronfluence's default tracking
    raises on (a subclass of a supported type; the model itself when it is one supported leaf), named with
    the fix, and the bare parameters (held beside a module's children) no tracked module carries."""
    outcome = CheckOutcome()
    unsupported = dict(record.get("unsupported") or {})
    if not unsupported:
        return outcome
    bare = {module: names for module, names in (record.get("bare_parameters") or {}).items() if names}
    left_out = "; ".join(f"{module}.{name}" for module, names in bare.items() for name in names)
    if "" in unsupported:
        message = (
            f"The model is itself one {unsupported['']}: kronfluence wraps a tracked module inside its parent, and "
            "the model has none (prepare_model recurses without end). Wrap it, e.g. nn.Sequential(model)."
        )
    else:
        named = ", ".join(f"{name} ({kind})" for name, kind in unsupported.items())
        message = (
            f"kronfluence's default tracking cannot wrap {len(unsupported)} module(s): {named}; it wraps exactly "
            "nn.Linear and nn.Conv2d, and prepare_model raises KeyError on a subclass."
            + (f" Bare parameters no tracked module carries are left out too: {left_out}." if left_out else "")
            + " The diagnosis went on with the modules kronfluence can track, a coverage change, not a repair: "
            "name them in your Task's get_influence_tracked_modules, as the prescription shows."
        )
    outcome.metrics["unsupported"] = unsupported
    outcome.findings.append(
        fail(
            "preflight.unsupported_modules",
            message,
            subject=next(iter(unsupported)),
            value=float(len(unsupported)),
            limit=0.0,
            cause=UNSUPPORTED_MODULE,
            stage="train",
        )
    )
    return outcome


def _listed(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f", … {len(names) - shown} more" if len(names) > shown else "")


def check_frozen(frozen: list[str], trained: list[str]) -> CheckOutcome:
    """`train.frozen_tracked` (warn): tracked modules the training never changed, beside modules it did (a
    LoRA fine-tune's frozen base layers). Their gradients enter every score; whether they belong there is
    the user's choice, so the list that tracks only what was trained is given, never applied."""
    outcome = CheckOutcome()
    if not frozen or not trained:
        return outcome
    shown = _listed(frozen)
    outcome.findings.append(
        warn(
            "train.frozen_tracked",
            f"kronfluence tracks {len(frozen)} module(s) the training never changed ({shown}) beside the "
            f"{len(trained)} it trained: their gradients enter every score. To analyse only what was trained, "
            f"return the trained modules from the Task's get_influence_tracked_modules ({_listed(trained)}; all "
            "of them in the train stage's metrics, frozen_tracked.trained).",
            subject=", ".join(frozen),
            value=float(len(frozen)),
            cause=FROZEN_TRACKED,
        )
    )
    outcome.metrics = {"frozen": list(frozen), "trained": list(trained)}
    return outcome
