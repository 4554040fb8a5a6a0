"""Every limit the checks hold numbers to, with the reason for its default.

Limits on rounding-sized quantities are multiples of the relevant dtype's epsilon (see `eps`), so the
same setting is right for fp16, bf16, fp32 and fp64. The limits are grouped by stage (`Thresholds.covariance`,
`.eigendecomposition`, `.scores`, `.precision`, `.preflight`, `.training`), but their names are flat and
unique: users override any limit by its name under `[tool.influence-doctor.thresholds]` in pyproject.toml
(`outlier_mad = 1e5`), and `Thresholds.value(name)` reads one back.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype (integers and bools count as exact: float64's epsilon)."""
    return torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float64).eps


def max_value(dtype: torch.dtype) -> float:
    """Largest finite value of a floating dtype (fp16: 65504)."""
    return torch.finfo(dtype).max if dtype.is_floating_point else float("inf")


@dataclass(frozen=True)
class CovarianceLimits:
    """The stored covariance sums: headroom and overflow measurement, symmetry, diagonal, dead units."""

    headroom_warn_fraction: float = field(
        default=0.1,
        metadata={"help": "Warn when a stored sum reaches this share of its dtype's max: 10x more data overflows."},
    )
    overflow_measure_share: float = field(
        default=0.1,
        metadata={
            "help": "A covariance projected to overflow is measured over all the data when one covariance pass "
            "takes at most this share of the projected full run (the rehearsal's own budget)..."
        },
    )
    overflow_measure_min_seconds: float = field(
        default=30.0,
        metadata={"help": "...or at most this many seconds, whatever the share: a short measurement beats a guess."},
    )
    symmetry_eps: float = field(
        default=1024.0,
        metadata={
            "help": "‖C−Cᵀ‖/‖C‖ allowed, in epsilons of the stored dtype; sums of xxᵀ are symmetric "
            "up to accumulation rounding, which stays far below a thousand epsilons."
        },
    )
    symmetry_max: float = field(
        default=1e-2,
        metadata={"help": "Cap on the symmetry limit: in fp16/bf16 a thousand epsilons would allow anything."},
    )
    negative_diagonal_eps: float = field(
        default=64.0,
        metadata={"help": "A diagonal entry below −this·eps·max(diag) is truly negative, not rounding."},
    )
    dead_unit_eps: float = field(
        default=1.0,
        metadata={"help": "A row whose largest |entry| is ≤ this·eps·max|C| carries no signal (a dead unit)."},
    )
    dead_unit_warn_fraction: float = field(
        default=0.25,
        metadata={
            "help": "Warn when more than this share of a factor's units are dead: the factor is "
            "rank-deficient by that much, and only damping keeps its inverse finite."
        },
    )


@dataclass(frozen=True)
class EigendecompositionLimits:
    """The eigendecomposition of each covariance, and the conditioning of Λ + damping (also used for Λ)."""

    orthogonality_eps: float = field(
        default=8.0,
        metadata={
            "help": "‖QᵀQ−I‖_F/√d allowed, in units of eps(precondition dtype) + √d·eps(eigendecomposition "
            "dtype): stored eigenvectors sit ~0.3 eps of their dtype from orthonormal, eigh's own error ~√d·eps."
        },
    )
    reconstruction_eps: float = field(
        default=16.0,
        metadata={
            "help": "‖QΛQᵀ−C‖_F/‖C‖_F allowed, in √d·eps of the coarser of the eigendecomposition "
            "and storage dtypes; a backward-stable eigh stays well below one such unit."
        },
    )
    negative_eigenvalue_eps: float = field(
        default=64.0,
        metadata={"help": "An eigenvalue below −this·eps·‖λ‖₂ is a real negative curvature, not rounding."},
    )
    effective_rank_eps: float = field(
        default=1.0,
        metadata={
            "help": "Eigenvalues ≤ this·eps·‖λ‖₂ count as zero for the effective rank: Weyl's bound "
            "on what rounding a matrix to eps can move."
        },
    )
    rank_deficient_fraction: float = field(
        default=0.5,
        metadata={
            "help": "Warn that a factor is rank-deficient when its effective rank is below this share of its "
            "size (normal with few examples; damping is what covers it)."
        },
    )
    max_condition_error: float = field(
        default=0.01,
        metadata={
            "help": "Warn when cond(Λ+δ)·eps(precondition dtype) exceeds this: preconditioned gradients may "
            "carry errors above 1% in their smallest directions (a bound: the float64 re-run decides)."
        },
    )
    damping_floor_eps: float = field(
        default=1.0,
        metadata={"help": "Damping below this·eps·λmax vanishes in rounding when added: it damps nothing."},
    )


@dataclass(frozen=True)
class ScoreLimits:
    """The score matrices: outliers, query scale, negative self-influence, module dominance, damping."""

    outlier_mad: float = field(
        default=65000.0,
        metadata={
            "help": "Warn when a pairwise score lies this many robust SDs (1.4826·MAD) from the median; influence "
            "is heavy-tailed (derived: healthy 99.5th percentile)."
        },
    )
    self_outlier_mad: float = field(
        default=290000.0,
        metadata={
            "help": "The same for self-influence, whose tail is heavier still: a few hard examples carry most of "
            "it (derived: healthy 99.5th percentile)."
        },
    )
    query_scale_ratio: float = field(
        default=41.0,
        metadata={
            "help": "Warn when one query's median |score| is this many times the median query's (derived: "
            "healthy 99.5th percentile)."
        },
    )
    negative_self_influence_eps: float = field(
        default=64.0,
        metadata={"help": "A self-influence below −this·eps·max|self| is negative for real: H was not PSD."},
    )
    module_dominance_share: float = field(
        default=0.99,
        metadata={
            "help": "Warn when one module carries more than this share of total |score| mass; the last layer of "
            "a healthy MLP often carries 90% (derived: healthy 99.5th percentile)."
        },
    )
    damping_sensitivity_min_spearman: float = field(
        default=0.9,
        metadata={
            "help": "Per-query Spearman under each module's damping ×10 below which the info finding says the "
            "rankings depend on the damping (a modeling choice: never a warn or fail)."
        },
    )


@dataclass(frozen=True)
class PrecisionLimits:
    """The float64 counterfactual: how far the configured precision may move rankings and factors."""

    precision_min_spearman: float = field(
        default=0.99,
        metadata={
            "help": "Median per-query Spearman vs float64 below which the configured precision reorders "
            "which examples look influential (a fidelity requirement, independent of any fixture)."
        },
    )
    precision_error_sqrt_eps: float = field(
        default=1.0,
        metadata={
            "help": "Relative factor error vs float64 allowed (a warn), in √eps of the factor's dtype: beyond "
            "it more than half of the dtype's significant digits are lost (fp32 3.5e-4, fp16 3.1e-2, bf16 8.8e-2)."
        },
    )
    precision_tie_eps: float = field(
        default=4.0,
        metadata={
            "help": "Rankings reordered by a relative error below this many eps of the dtype are ties broken "
            "by rounding, not a wrong result."
        },
    )
    hooks_error_sqrt_eps: float = field(
        default=1.0,
        metadata={
            "help": "Relative error of kronfluence's hooks against autograd allowed, in √eps of the model's dtype: "
            "a call the hooks miss is a share of the gradient (O(1)), rounding stays far below √eps (fp32 3.5e-4)."
        },
    )
    seed_min_spearman: float = field(
        default=0.9,
        metadata={
            "help": "Median per-query Spearman between two sampling seeds of the true Fisher (projected to the full "
            "run) below which the rankings are one draw among many (a fidelity requirement, as for a fix)."
        },
    )


@dataclass(frozen=True)
class PreflightLimits:
    """What is checked before any factor is fitted: module sizes, the Task's contract, coverage."""

    # pre-flight sizes
    preflight_eigh_seconds: float = field(
        default=300.0,
        metadata={
            "help": "Warn before fitting when one module's eigendecomposition is projected (n³ from a measured "
            "small eigh) past this many seconds: five minutes for one step of one module is past any rehearsal."
        },
    )
    # the Task's contract
    contract_rtol_sqrt_eps: float = field(
        default=1.0,
        metadata={
            "help": "Relative difference allowed between a batch's loss (and gradient) and the sum over its "
            "examples alone, in √eps of the dtype it is measured in (float64 1.5e-8: a different summation "
            "order stays far below; a batch mean is off by 1 − 1/B)."
        },
    )
    # coverage
    min_tracked_share: float = field(
        default=0.5,
        metadata={
            "help": "Warn when kronfluence's tracked modules hold less than this share of the trainable "
            "parameters: the scores then describe a minority of the model (embeddings and norms alone rarely "
            "reach half)."
        },
    )


@dataclass(frozen=True)
class TrainingLimits:
    """Heuristics on the loss curve; the derived ones come from rules.LIMIT_RULES on 600 healthy runs."""

    loss_window_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of steps averaged into each window (start, end, lowest level) when comparing losses."},
    )
    loss_window_min_steps: float = field(
        default=5.0,
        metadata={"help": "Fewest steps in a window: fewer minibatch losses average too little of their noise away."},
    )
    loss_rise_significance: float = field(
        default=1.8,
        metadata={
            "help": "Warn that the loss did not decrease when its last window is this many standard errors (of the "
            "step-to-step noise) above its first, or equal on a noiseless curve (derived: healthy 99.5th percentile)."
        },
    )
    divergence_ratio: float = field(
        default=3.0,
        metadata={
            "help": "Fail as diverged when the last window's (geometric) mean loss is this multiple of the lowest "
            "window's (healthy runs with small batches reach 30×, hence the significance test below)."
        },
    )
    divergence_significance: float = field(
        default=4.5,
        metadata={
            "help": "A climb above the lowest window counts as divergence only beyond this many standard errors "
            "of the step-to-step noise, log scale (derived: healthy maximum × 1.5)."
        },
    )
    loss_rise_fail_significance: float = field(
        default=3.6,
        metadata={
            "help": "Fail as diverged when the last window sits this many standard errors above the first: "
            "beyond every healthy run (derived: healthy maximum × 1.5)."
        },
    )
    start_rise_ratio: float = field(
        default=2.0,
        metadata={
            "help": "Fail as diverged when the last window's median loss is at least this multiple of the first "
            "recorded loss (the untrained model's): a clear rise, not a wobble..."
        },
    )
    start_rise_significance: float = field(
        default=13.0,
        metadata={
            "help": "...and that rise is this many standard errors of the second half's step-to-step noise, on a "
            "log scale (derived: healthy maximum × 1.5)."
        },
    )
    trained_loss_warn_ratio: float = field(
        default=1.1,
        metadata={
            "help": "Warn when the trained model's loss on a fixed sample of its training examples is this multiple "
            "of the untrained model's: training did not lower it (derived: healthy 99.5th percentile)."
        },
    )
    trained_loss_fail_ratio: float = field(
        default=1.5,
        metadata={
            "help": "Fail as diverged when the trained model's sample loss is this multiple of an untrained "
            "model's (the larger of its own start and a freshly initialised copy's): worse than knowing nothing, "
            "beyond every healthy run (derived: healthy maximum × 1.5)."
        },
    )
    trained_loss_unreferenced_fail_ratio: float = field(
        default=4.4,
        metadata={
            "help": "The same against the untrained model's loss alone, where no fresh copy was measured (a model "
            "beyond the evidence budget): a fine-tuned start can be near zero, hence the wider margin (derived: "
            "healthy maximum × 3)."
        },
    )
    uphill_cosine: float = field(
        default=0.19,
        metadata={
            "help": "Fail as diverged when the sample loss rose and the change training made to the parameters "
            "has at least this cosine with the loss's gradient at the start: it climbed the loss, a sign error "
            "(derived: healthy maximum × 1.5)."
        },
    )
    sample_rise_significance: float = field(
        default=3.0,
        metadata={
            "help": "A training fail needs the sample loss to rise by this many standard errors of its difference "
            "over the sample's groups (one-sided, under 1 % by chance with 16 groups): a smaller rise is noise."
        },
    )
    uphill_gradient_alpha: float = field(
        default=0.001,
        metadata={
            "help": "The uphill cosine is evidence only when the start's gradient stands out of its per-group noise: "
            "a zero gradient (a minimum, where its direction is noise) passes with at most this probability."
        },
    )
    explosion_height: float = field(
        default=8.9,
        metadata={
            "help": "Fail as diverged when the sample loss ended no lower than it started and the logged loss "
            "peaked at this multiple of the untrained level on the way: it blew up and never recovered "
            "(derived: healthy maximum × 1.5)."
        },
    )
    divergence_min_share: float = field(
        default=0.01,
        metadata={
            "help": "A climb on the curve is divergence (a fail) only when it undoes at least this share of an "
            "untrained model's sample loss; smaller ones near zero loss are a fitted model wandering (a warn)."
        },
    )
    oscillation_significance: float = field(
        default=4.4,
        metadata={
            "help": "A second half whose detrended loss swings this regularly, periodicity × √steps (the "
            "periodicity is min(−r(k), r(2k)), about the share of its variance in the swing), oscillates "
            "(derived: healthy maximum × 1.5 over swings large enough to count)."
        },
    )
    oscillation_min_amplitude: float = field(
        default=0.25,
        metadata={
            "help": "Peak-to-peak swing (2√2·std of the detrended second half) relative to the loss "
            "level that makes a regular swing an oscillation rather than ripple at convergence."
        },
    )
    oscillation_max_progress: float = field(
        default=0.25,
        metadata={
            "help": "A regular swing is a fail (no convergence) when the second half's mean loss is less than "
            "this share below the first half's; a loss that descends more only gets a warn."
        },
    )
    max_generalization_gap: float = field(
        default=1.3,
        metadata={
            "help": "Warn when final validation loss exceeds the training loss (upper 2-SE bound) by more than "
            "this multiple of the initial training loss (derived: healthy 99.5th percentile)."
        },
    )


@dataclass(frozen=True)
class Thresholds:
    """Every limit, grouped by the stage it judges; `from_mapping`, `value` and `flat` speak the flat names."""

    covariance: CovarianceLimits = field(
        default_factory=CovarianceLimits,
        metadata={"help": "The covariance sums: headroom, overflow measurement, symmetry, diagonal, dead units."},
    )
    eigendecomposition: EigendecompositionLimits = field(
        default_factory=EigendecompositionLimits,
        metadata={"help": "Eigenvectors and eigenvalues, rank, and the conditioning of Λ + damping (also for Λ)."},
    )
    scores: ScoreLimits = field(
        default_factory=ScoreLimits,
        metadata={"help": "Score outliers, query scale, negative self-influence, module dominance, damping."},
    )
    precision: PrecisionLimits = field(
        default_factory=PrecisionLimits,
        metadata={"help": "The float64 counterfactual: rankings and factor errors against the configured precision."},
    )
    preflight: PreflightLimits = field(
        default_factory=PreflightLimits,
        metadata={"help": "Before any factor: projected eigh time, the Task's contract tolerance, coverage."},
    )
    training: TrainingLimits = field(
        default_factory=TrainingLimits,
        metadata={"help": "The loss curve and the trained model's loss on a sample of its training examples."},
    )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every limit's flat config name, group by group in declaration order."""
        return tuple(_GROUP_OF)

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> Thresholds:
        """Build from a config table of flat names; an unknown key is a ValueError naming it and the known ones."""
        unknown = sorted(set(values) - set(_GROUP_OF))
        if unknown:
            raise _unknown(unknown[0])
        grouped: dict[str, dict[str, float]] = {}
        for name, value in values.items():
            grouped.setdefault(_GROUP_OF[name], {})[name] = float(value)
        return cls(**{group.name: group.default_factory(**grouped.get(group.name, {})) for group in fields(cls)})

    def value(self, name: str) -> float:
        """One limit by its flat config name (`thresholds.value("outlier_mad")`)."""
        if name not in _GROUP_OF:
            raise _unknown(name)
        return getattr(getattr(self, _GROUP_OF[name]), name)

    def flat(self) -> dict[str, float]:
        """Every limit by its flat config name, in `names()` order."""
        return {name: self.value(name) for name in _GROUP_OF}


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown threshold {name!r}; known thresholds are: {', '.join(sorted(_GROUP_OF))}")


def _group_of() -> dict[str, str]:
    """Flat name → the group attribute holding it; the names must be unique across groups."""
    located: dict[str, str] = {}
    for group in fields(Thresholds):
        for limit in fields(group.default_factory):
            if limit.name in located:
                raise TypeError(f"threshold {limit.name!r} is in both {located[limit.name]} and {group.name}")
            located[limit.name] = group.name
    return located


_GROUP_OF: dict[str, str] = _group_of()
