"""The causes the doctor knows: one row each, and the only place a cause's tag is spelled.

A row says what the cause is (its tag and one line of explanation), what makes it a suspect (the kinds of
symptom it can explain), how it is convicted (its hypotheses: one-setting changes in the vocabulary of
`changes.py`, each with what it must do to the failing measurement; none for a cause its symptom proves),
how it is treated (its ladder of rungs, least distorting first) and what kind of cause it is. The tag
vocabulary, the explanations, whether a problem is treatable, the report schema's enum and the README's
list of causes all come from this table; a check names the cause it suspects by the row's constant.

Rows are tried in table order: for a symptom, the first row whose hypothesis comes out as predicted
names the cause. To add a cause, add its row here and the check that emits it (and their tests).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from influence_doctor.dtypes import GROUP_STAGE, group_dtypes, groups_in_use, is_below

FLOAT64 = "float64:end-to-end"
"""The precision counterfactual: every dtype float64 and no autocast, the damping unchanged."""

OVERFLOW_PRONE = (torch.float16,)
"""Dtypes with float16's range: sums that are finite in float32 or bfloat16 overflow in them."""

# --- ladders: rungs from the least to the most distorting --------------------------------------------

DTYPE_RUNGS = ("dtype:bfloat16", "dtype:float32", "dtype:float64")
EIGEN_RUNGS = (
    "eigendecomposition-dtype:float64",
    "covariance-dtype:float32",
    "covariance-dtype:float64",
    "shift:1e-6",
)
SHIFT_RUNGS = ("shift:1e-6", "shift:1e-4", "shift:1e-2", "shift:0.1", "shift-trace:0.2")
DAMPING_RUNGS = ("damping:floor", "damping:floor-x100", "damping:heuristic", "damping:heuristic-x10")
"""Smallest first: the rounding floor eps·λmax (the least damping that damps anything), 100× it,
kronfluence's heuristic (0.1× each module's mean eigenvalue), 10× that."""
MEMORY_RUNGS = ("partitions:x2", "offload:on", "iterative-lambda:on", "batch:half")
STRATEGY_FALLBACK = ("strategy:kfac", "strategy:diagonal", "strategy:identity")
"""The last resort for anything still failing: each changes the quantity computed, so each is held to the
same fidelity bar against float64 of the strategy asked for, and the report says the method changed."""

TRAINING_ADVICE = (
    "Influence of a broken model is meaningless: lower the learning rate 2-5x, add a warmup, clip gradients "
    "(e.g. max norm 1.0), and watch the validation loss; then re-run the doctor on the retrained model."
)


@dataclass(frozen=True)
class Hypothesis:
    """A cause, where it starts, what its remedies act on, and the experiments that would confirm it:
    each step is a change of `changes.py` (acting on this hypothesis's stage and setting) and whether it
    must clear the symptom or leave it standing."""

    cause: str
    stage: str
    setting: str | None
    steps: tuple[tuple[str, str], ...]  # (change, "clears" | "persists"), e.g. ("dtype:float32", "clears")


@dataclass(frozen=True)
class Context:
    """What the hypotheses depend on besides the symptom: the settings as configured."""

    factor_args: Any
    score_args: Any
    score_stage: str
    rank_deficient: bool = False  # the checks saw a factor with zero directions (dead units, low rank)


Hypotheses = Callable[[Any, Context], list[Hypothesis]]
"""(symptom, context) → the hypotheses to test; a symptom has `kind`, `stage` and `findings`."""


@dataclass(frozen=True)
class Cause:
    """One row of the table."""

    tag: str
    explanation: str  # what it is, in one line
    confirmed_by: str  # how the doctor convicts it, for a person (the README's list)
    suggested_by: frozenset[str] = frozenset()  # symptom kinds it can explain
    hypotheses: Hypotheses | None = None  # None: the symptom is the proof (measured directly)
    ladder: tuple[str, ...] = ()  # rungs to climb, least distorting first
    treatable: bool = True  # a setting can fix it (a broken model, a wrong Task cannot be fixed by one)
    repairs_task: bool = False  # its rungs wrap the Task: treatable at the train stage
    fallback: bool = True  # the strategy fallback follows its ladder (no other method mends a wrong Task or
    # a hook that misses part of a gradient)
    explains_downstream: bool = False  # a broken model: everything computed from it fails with it
    rehearsable: bool = True  # its rungs can be rehearsed on a subsample (memory depends on the full size)
    presumed_for: frozenset[str] = frozenset()  # symptom kinds ("kind" or "kind@stage") `inspect` presumes it for
    note: str = ""  # said after the cause in a diagnosis message
    advice: str = ""  # what a person should do, where no rung can

    def hypotheses_for(self, symptom: Any, context: Context) -> list[Hypothesis]:
        if self.hypotheses is not None:
            return self.hypotheses(symptom, context)
        named = {finding.cause for finding in symptom.findings if finding.cause}
        if symptom.kind in SELF_NAMING_KINDS and self.tag not in named:
            return []  # these symptoms name their cause themselves: a row is a suspect only when named
        return [Hypothesis(self.tag, symptom.stage, None, ())]


SELF_NAMING_KINDS = frozenset({"training", "reduction", "examples", "preflight", "unsupported", "hooks"})
"""Symptom kinds whose findings name their own cause (a diverged curve, a mean-reduced loss)."""


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _stage_of(group: str, context: Context) -> str:
    stage = GROUP_STAGE[group]
    return context.score_stage if stage == "scores" else stage


def _raise(symptom: Any, context: Context, cause: str, prone: Callable[[torch.dtype], bool], target) -> list:
    """One hypothesis per group feeding the symptom's stage whose dtype `prone` accepts: raising it
    to `target` must clear the symptom."""
    hypotheses = []
    for group in groups_in_use(context.factor_args, symptom.stage):
        dtypes = group_dtypes(context.factor_args, context.score_args, group)
        if any(d is not None and prone(d) and is_below(d, target, group) for d in dtypes):
            step = (f"dtype:{_name(target)}", "clears")
            hypotheses.append(Hypothesis(cause, _stage_of(group, context), group, (step,)))
    return hypotheses


def _fp16_overflow(symptom: Any, context: Context) -> list[Hypothesis]:
    return _raise(symptom, context, "fp16-overflow", lambda d: d in OVERFLOW_PRONE, torch.float32)


def _low_precision(symptom: Any, context: Context) -> list[Hypothesis]:
    """One stage's dtypes raised to float64 at a time, then, when the loss is spread over several
    stages, all of them together (the float64 run itself, which the symptom was measured against)."""
    single = _raise(symptom, context, "low-precision-loss", lambda d: True, torch.float64)
    if len(single) > 1:
        from influence_doctor.pipeline import STAGES

        stage = min((h.stage for h in single), key=STAGES.index)
        single.append(Hypothesis("low-precision-loss", stage, "all", ((FLOAT64, "clears"),)))
    return single


def _eigh_in_float64(cause: str) -> Hypotheses:
    """eigh in float64, or float64 covariances, succeed (or reconstruct) where the configured ones did not."""

    def hypotheses(symptom: Any, context: Context) -> list[Hypothesis]:
        if symptom.stage != "eigendecomposition":
            return []
        found = []
        for group in ("eigendecomposition", "covariance"):
            dtypes = group_dtypes(context.factor_args, context.score_args, group)
            if any(is_below(d, torch.float64, group) for d in dtypes):
                found.append(Hypothesis(cause, "eigendecomposition", group, (("dtype:float64", "clears"),)))
        return found

    return hypotheses


def _dtype_drift(symptom: Any, context: Context) -> list[Hypothesis]:
    stored = group_dtypes(context.factor_args, context.score_args, "covariance")
    if not any(is_below(d, torch.float32, "covariance") for d in stored):
        return []
    return [Hypothesis("dtype-drift", "eigendecomposition", "covariance", (("dtype:float32", "clears"),))]


def _tiny_damping(symptom: Any, context: Context) -> list[Hypothesis]:
    """Not precision (float64 at the same damping still fails) and damping is what lifts it."""
    if symptom.stage not in ("pairwise_scores", "self_scores"):
        return []
    damping = ("damping:x10", "clears")
    if symptom.kind == "undefined":  # measured on the float64 trial already
        return [Hypothesis("tiny-damping", symptom.stage, "damping", (damping,))]
    return [Hypothesis("tiny-damping", symptom.stage, "damping", ((FLOAT64, "persists"), damping))]


def _singular(rank_deficient: bool) -> Hypotheses:
    """eigh fails even in float64: the matrix itself needs lifting (a factor with zero directions is
    rank-deficient, any other ill-conditioned)."""
    cause = "rank-deficient" if rank_deficient else "ill-conditioned"

    def hypotheses(symptom: Any, context: Context) -> list[Hypothesis]:
        if symptom.stage != "eigendecomposition" or context.rank_deficient != rank_deficient:
            return []
        steps = ((FLOAT64, "persists"), ("shift:1e-6", "clears"))
        return [Hypothesis(cause, "covariance", "covariance", steps)]

    return hypotheses


def _not_psd(symptom: Any, context: Context) -> list[Hypothesis]:
    steps = ((FLOAT64, "persists"), ("shift:1e-6", "clears"))
    return [Hypothesis("not-psd", symptom.stage, "covariance", steps)]


HOOK_ON_A_GRADIENT_FREE_TENSOR = "register a hook on a tensor that doesn't require gradient"
"""PyTorch's words when kronfluence's hooks meet the gradient-free first pass of a reentrant checkpoint."""


def _recomputed_forward(symptom: Any, context: Context) -> list[Hypothesis]:
    """A stage raised where kronfluence registers its hooks on a tensor without gradient: a reentrant
    activation checkpoint; made non-reentrant (the same numbers), the stage must run."""
    if HOOK_ON_A_GRADIENT_FREE_TENSOR not in getattr(symptom, "error", ""):
        return []
    return [Hypothesis("recomputed-forward", symptom.stage, "model", (("checkpoint:non-reentrant", "clears"),))]


def _nonfinite_model(symptom: Any, context: Context) -> list[Hypothesis]:
    """NaN weights are the proof; inf/NaN in a stage that no precision removes comes from the model or data."""
    if symptom.kind == "model":
        return [Hypothesis("nonfinite-model", symptom.stage, None, ())]
    return [Hypothesis("nonfinite-model", symptom.stage, None, ((FLOAT64, "persists"),))]


TRAINING_DIVERGED = Cause(
    "training-diverged",
    "training blew up",
    "measured directly: the loss curve, and the Task's loss on a fixed sample before and after training",
    frozenset({"training"}),
    treatable=False,
    explains_downstream=True,
    advice=TRAINING_ADVICE,
)
TRAINING_OSCILLATING = Cause(
    "training-oscillating",
    "training oscillates instead of converging",
    "measured directly: a regular swing of the loss curve that makes no progress",
    frozenset({"training"}),
    treatable=False,
    advice=TRAINING_ADVICE,
)
LOSS_NOT_SUMMED = Cause(
    "loss-not-summed",
    "the Task's loss or measurement is a batch mean, not a sum over examples",
    "measured directly: the Task on batches of 2 and 4 against the sum over their examples alone, 1/B at both",
    frozenset({"reduction"}),
    ladder=("task:sum",),
    repairs_task=True,
    fallback=False,
)
BATCH_DEPENDENT = Cause(
    "batch-dependent",
    "an example's loss or gradient depends on the other examples in its batch",
    "measured directly: the Task on a batch is neither the sum nor the mean of its examples alone",
    frozenset({"reduction"}),
    treatable=False,
)
NONFINITE_EXAMPLES = Cause(
    "nonfinite-examples",
    "some examples' loss is inf/NaN, and kronfluence scores them 0",
    "measured directly: every analysed example and query alone",
    frozenset({"examples"}),
    treatable=False,
)
OUT_OF_MEMORY = Cause(
    "out-of-memory",
    "a stage ran out of memory",
    "measured directly: the allocator's error (CUDA, MemoryError, CPU allocator), or the pre-flight bytes "
    "against the memory budget",
    frozenset({"oom", "preflight"}),
    ladder=MEMORY_RUNGS,
    rehearsable=False,
    presumed_for=frozenset({"oom"}),
)
RECOMPUTED_FORWARD = Cause(
    "recomputed-forward",
    "the model recomputes its forward under reentrant activation checkpointing, where kronfluence's hooks "
    "cannot register",
    "a stage raised on a hook registered on a tensor without gradient, and the same stage with every checkpoint "
    "made non-reentrant runs",
    frozenset({"raised"}),
    _recomputed_forward,
    ("checkpoint:non-reentrant",),
    fallback=False,
    note="the fix in your model: torch.utils.checkpoint.checkpoint(..., use_reentrant=False), or no "
    "checkpointing while you compute influence",
)
FP16_OVERFLOW = Cause(
    "fp16-overflow",
    "a float16 sum or product passed 65504 and became inf",
    "raising one float16 setting that feeds the stage (autocast, covariance, lambda, score dtypes) to float32 "
    "removes the inf/NaN",
    frozenset({"nonfinite", "raised", "projected"}),
    _fp16_overflow,
    DTYPE_RUNGS,
)
EIGENDECOMPOSITION_FAILED = Cause(
    "eigendecomposition-failed",
    "the eigendecomposition failed on a valid-looking covariance",
    "eigh in float64, or float64 covariances, succeed",
    frozenset({"nonfinite", "raised"}),
    _eigh_in_float64("eigendecomposition-failed"),
    EIGEN_RUNGS,
    presumed_for=frozenset({"raised@eigendecomposition"}),
)
DTYPE_DRIFT = Cause(
    "dtype-drift",
    "results computed in high precision were stored in a lower one",
    "float32 covariances (where kronfluence stores eigenvectors) bring ‖QᵀQ−I‖ within its limit",
    frozenset({"orthogonality"}),
    _dtype_drift,
    ("dtype:float32", "dtype:float64"),
)
EIGENDECOMPOSITION_INACCURATE = Cause(
    "eigendecomposition-inaccurate",
    "the eigendecomposition does not reproduce its covariance",
    "eigh in float64, or float64 covariances, reconstruct the covariance",
    frozenset({"orthogonality", "reconstruction"}),
    _eigh_in_float64("eigendecomposition-inaccurate"),
    EIGEN_RUNGS,
    presumed_for=frozenset({"orthogonality", "reconstruction"}),
)
LOW_PRECISION_LOSS = Cause(
    "low-precision-loss",
    "the configured precision measurably changes the result against float64",
    "raising one stage's dtypes to float64 restores agreement with the float64 run",
    frozenset({"disagreement", "nonfinite", "negative"}),
    _low_precision,
    DTYPE_RUNGS,
    presumed_for=frozenset({"disagreement"}),
    note="a higher precision keeps your damping; a larger damping, your modeling choice, would also do",
)
TINY_DAMPING = Cause(
    "tiny-damping",
    "the damping does not cover directions without curvature, so influence is undefined there",
    "the failure persists in float64 at the same damping, and every module's damping ×10 lifts it",
    frozenset({"nonfinite", "undefined"}),
    _tiny_damping,
    DAMPING_RUNGS,
    presumed_for=frozenset({"undefined"}),
)
RANK_DEFICIENT = Cause(
    "rank-deficient",
    "the factor is singular and nothing lifts its zero directions",
    "the failure persists in float64, and a 1e-6·mean(diag) shift lifts it",
    frozenset({"raised"}),
    _singular(rank_deficient=True),
    SHIFT_RUNGS,
)
ILL_CONDITIONED = Cause(
    "ill-conditioned",
    "the curvature spans more orders of magnitude than even float64 resolves",
    "the failure persists in float64, and a 1e-6·mean(diag) shift lifts it",
    frozenset({"raised"}),
    _singular(rank_deficient=False),
    SHIFT_RUNGS,
)
NOT_PSD = Cause(
    "not-psd",
    "a quantity that must be positive semidefinite has negative values",
    "the failure persists in float64, and a 1e-6·mean(diag) shift lifts it",
    frozenset({"negative"}),
    _not_psd,
    SHIFT_RUNGS,
    presumed_for=frozenset({"negative"}),
)
NONFINITE_MODEL = Cause(
    "nonfinite-model",
    "the model or its data produce inf/NaN",
    "the weights are inf/NaN, or inf/NaN persists in float64",
    frozenset({"model", "nonfinite"}),
    _nonfinite_model,
    treatable=False,
    explains_downstream=True,
    advice=TRAINING_ADVICE,
)
UNSUPPORTED_MODULE = Cause(
    "unsupported-module",
    "kronfluence's default tracking cannot wrap a module of the model (a subclass of Linear or Conv2d, or the "
    "model itself when it is one)",
    "measured directly, before any factor: the modules the default tracking would wrap and cannot, named",
    frozenset({"unsupported"}),
    treatable=False,
)
SHARED_PARAMETERS = Cause(
    "shared-parameters",
    "a tracked module runs more than once per forward, or its weight is tied to another module's: kronfluence's "
    "hooks see part of its gradient",
    "measured by the hooks against autograd: a module's gradient inner products disagree, it runs more than once "
    "per forward and the hooks agree with its last call alone; a tied weight is a warning with the share it sees",
    frozenset({"hooks"}),
    ladder=("shared:true",),
    fallback=False,
    advice="If has_shared_parameters=True does not heal it, leave the module untracked (a "
    "get_influence_tracked_modules without it) or give each call its own module.",
)
ASYMMETRIC = Cause(
    "asymmetric",
    "a covariance that must be symmetric is not",
    "a warning of the covariance checks (‖C−Cᵀ‖/‖C‖ beyond its dtype's rounding)",
)
SCORE_OUTLIERS = Cause(
    "score-outliers",
    "a few scores dwarf all others",
    "a warning of the score checks, calibrated on healthy pipelines",
)
FROZEN_TRACKED = Cause(
    "frozen-tracked",
    "kronfluence tracks modules the training never changed (a LoRA fine-tune's frozen base layers): their "
    "gradients enter every score",
    "measured: the tracked parameters fingerprinted before and after training, and the rankings with only the "
    "trained modules tracked, at the same sampling seed",
    treatable=False,
)
FISHER_SAMPLING_NOISE = Cause(
    "fisher-sampling-noise",
    "the true Fisher's factors are Monte-Carlo estimates from sampled targets: the rankings change with the "
    "sampling seed",
    "measured: the factors refitted with a second sampling seed rank the examples differently (at the rehearsal's "
    "size, projected to the full run from the measured trend)",
    treatable=False,
)
UNTRACKED_MODULES = Cause(
    "untracked-modules",
    "parameters outside kronfluence's tracked modules are invisible to the scores",
    "a warning before any factor: the share of trainable parameters kronfluence tracks",
)

CAUSES: tuple[Cause, ...] = (
    TRAINING_DIVERGED,
    TRAINING_OSCILLATING,
    LOSS_NOT_SUMMED,
    BATCH_DEPENDENT,
    NONFINITE_EXAMPLES,
    OUT_OF_MEMORY,
    RECOMPUTED_FORWARD,
    FP16_OVERFLOW,
    EIGENDECOMPOSITION_FAILED,
    DTYPE_DRIFT,
    EIGENDECOMPOSITION_INACCURATE,
    LOW_PRECISION_LOSS,
    TINY_DAMPING,
    RANK_DEFICIENT,
    ILL_CONDITIONED,
    NOT_PSD,
    NONFINITE_MODEL,
    UNSUPPORTED_MODULE,
    SHARED_PARAMETERS,
    ASYMMETRIC,
    SCORE_OUTLIERS,
    UNTRACKED_MODULES,
    FROZEN_TRACKED,
    FISHER_SAMPLING_NOISE,
)
"""The table, in the order its rows are tried: direct measurements, then the cheapest single-setting
explanations, then a broken model; rows no symptom suggests (warnings only) last."""

TAGS: tuple[str, ...] = tuple(cause.tag for cause in CAUSES)
"""The fixed vocabulary of root-cause tags."""

BY_TAG: Mapping[str, Cause] = {cause.tag: cause for cause in CAUSES}


def cause(tag: str | None) -> Cause | None:
    """The row of `tag` (None for None, or for a tag no row has)."""
    return BY_TAG.get(tag) if tag is not None else None


def suspects(kind: str) -> list[Cause]:
    """The rows a symptom of `kind` makes suspects, in the order they are tried."""
    return [row for row in CAUSES if kind in row.suggested_by]


def presumed(kind: str, stage: str) -> str | None:
    """The cause `inspect` presumes for a symptom it cannot experiment on."""
    return next((row.tag for row in CAUSES if kind in row.presumed_for or f"{kind}@{stage}" in row.presumed_for), None)


def default_ladders() -> dict[str, tuple[str, ...]]:
    """Cause tag → its rungs. Causes without a ladder (a broken model) have no fix."""
    return {row.tag: row.ladder for row in CAUSES if row.ladder}


def ladder_for(tag: str | None, overrides: Mapping[str, list[str]] | None = None) -> tuple[str, ...]:
    """The rungs to climb for `tag` (its row's, or the configured override), then the strategy fallback
    for anything still failing, unless the cause is in the Task, which no other method computes right."""
    row = cause(tag)
    if row is None:
        return STRATEGY_FALLBACK
    rungs = tuple((overrides or {}).get(row.tag, row.ladder))
    if not row.fallback:
        return rungs
    return rungs + tuple(r for r in STRATEGY_FALLBACK if r not in rungs)


def treatable(tag: str | None, stage: str) -> bool:
    """Whether a setting can fix a problem of this cause at this stage: not a broken model, and before
    any factor (the train stage) only a cause whose rungs repair the Task."""
    row = cause(tag)
    if row is None:
        return stage != "train"
    return row.treatable and (stage != "train" or row.repairs_task)


def markdown_table() -> str:
    """The README's list of causes, one row per row of the table, in the order they are tried."""
    lines = ["| cause | what it is | confirmed by | ladder |", "|---|---|---|---|"]
    for row in CAUSES:
        rungs = ", ".join(f"`{rung}`" for rung in row.ladder) if row.ladder else "—"
        if row.ladder and row.fallback:
            rungs += ", then the strategy fallback"
        lines.append(f"| `{row.tag}` | {row.explanation} | {row.confirmed_by} | {rungs} |")
    return "\n".join(lines) + "\n"


BEGIN_MARK = "<!-- causes: generated from src/influence_doctor/causes.py by `make generated` -->\n"
END_MARK = "<!-- /causes -->\n"


def with_table(markdown: str) -> str:
    """`markdown` with the list of causes between its markers written from the table."""
    start, end = markdown.index(BEGIN_MARK) + len(BEGIN_MARK), markdown.index(END_MARK)
    return markdown[:start] + markdown_table() + markdown[end:]


def main(argv: list[str]) -> int:
    """`python -m influence_doctor.causes README.md`: rewrite the file's list of causes from the table."""
    from pathlib import Path

    for name in argv:
        path = Path(name)
        path.write_text(with_table(path.read_text(encoding="utf-8")), encoding="utf-8")
        print(f"wrote the list of causes in {path}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
