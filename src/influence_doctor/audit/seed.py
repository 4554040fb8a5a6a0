"""The rankings against a second sampling seed of the true Fisher (`fisher-sampling-noise`).

With kronfluence's default (`use_empirical_fisher=False`) the covariances and Λ are Monte-Carlo
estimates from targets sampled from the model, so the user's rankings are one draw. The doctor refits the
factors with a second sampling seed (`sampling-seed:1`; the draws are per example, `runner/sampling.py`)
and compares the rankings at the rehearsal's size, where the run's own factors are. The noise falls with
the examples the factors see, so the agreement is measured twice — with the probe's factors and with the
rehearsal's, both on the probe's examples — and the trend between them, 1 − ρ ∝ n^−α (α clipped to
[0, 1]: a Monte-Carlo estimate's variance falls no faster than 1/n), projects it to the full run. When
the probe's own factors already agree at the bar, the rehearsal's are not refitted: more examples only
lower the noise, so the probe's value is a lower bound for the run, and said so.

The options a person has are measured only when the agreement is below the bar, on the probe: the
empirical Fisher (deterministic, and a different quantity: its agreement with the true Fisher is said),
the damping heuristic (a modeling choice), and more examples for the covariance (from the trend).
"""

from __future__ import annotations

import math
import time
from typing import Any

from influence_doctor import changes
from influence_doctor.checks.precision import score_agreement
from influence_doctor.checks.seed import SeedAgreement
from influence_doctor.configuration import Configuration
from influence_doctor.labs import Labs

SECOND_SEED = 1
"""The second draw's sampling seed (the run's own draw is seed 0)."""


def measure_seed(run: Any, labs: Labs, configuration: Configuration, bar: float) -> SeedAgreement:
    """The rankings of `configuration` against the same with the true Fisher's targets drawn again; a
    measurement that raises is skipped with the reason, never fatal."""
    try:
        return _measure(run, labs, configuration, bar)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        return SeedAgreement(skipped=f"the second seed raised {type(exc).__name__}: {text[0] if text else ''}")


def _measure(run: Any, labs: Labs, configuration: Configuration, bar: float) -> SeedAgreement:
    started = time.perf_counter()
    result = SeedAgreement()
    why = _not_sampled(run, labs, configuration)
    if why:
        result.skipped = why
        return result
    kind = result.kind = "pairwise" if "pairwise" in run.session.kinds else "self"
    other = changes.apply(f"sampling-seed:{SECOND_SEED}", configuration)
    probe, rehearsal = labs.probe, labs.rehearsal
    columns = probe.examples
    kinds = (kind,)  # one kind of scores is what the rankings are compared on
    second_seed = "second sampling seed"
    on_probe = _agreement(probe.trial(configuration, kinds), probe.trial(other, kinds, label=second_seed), kind)
    result.trend.append((probe.examples, on_probe["median_spearman"]))
    measured = on_probe
    result.lower_bound = on_probe["median_spearman"] >= bar  # more examples only lower the noise: no refit
    if rehearsal is not None and rehearsal.examples > probe.examples and not result.lower_bound:
        first, second = rehearsal.trial(configuration, kinds), rehearsal.trial(other, kinds, label=second_seed)
        measured = _agreement(first, second, kind)
        result.trend.append((rehearsal.examples, _agreement(first, second, kind, columns)["median_spearman"]))
    result.examples = probe.examples if len(result.trend) == 1 else rehearsal.examples
    result.median_spearman = measured["median_spearman"]
    result.worst_spearman = measured["worst_spearman"]
    result.top_overlap = measured["top_overlap"]
    result.exponent = noise_exponent(result.trend)
    total = run.train_examples_total
    if total > result.examples and not math.isnan(result.median_spearman) and not result.lower_bound:
        result.projected_examples = total
        result.projected_median = project(result.median_spearman, result.examples, total, result.exponent or 0.0)
    if result.judged < bar:
        result.options = _options(run, labs, configuration, other, kind, result, bar)
    result.seconds = time.perf_counter() - started
    return result


def noise_exponent(trend: list[tuple[int, float]]) -> float | None:
    """α of 1 − ρ ∝ n^−α through the two measured points, clipped to [0, 1] (None without two points)."""
    if len(trend) < 2:
        return None
    (n1, rho1), (n2, rho2) = trend[0], trend[-1]
    if n2 <= n1 or any(math.isnan(value) for value in (rho1, rho2)):
        return None
    gap1, gap2 = max(1.0 - rho1, 1e-12), max(1.0 - rho2, 1e-12)
    return min(1.0, max(0.0, math.log(gap1 / gap2) / math.log(n2 / n1)))


def project(rho: float, examples: int, total: int, exponent: float) -> float:
    """ρ measured with `examples` carried to `total` examples along 1 − ρ ∝ n^−α."""
    return 1.0 - (1.0 - rho) * (total / examples) ** (-exponent)


def examples_for(bar: float, rho: float, examples: int, exponent: float | None) -> int | None:
    """The examples the trend says the factors need for the median agreement to reach `bar` (None when the
    trend does not fall)."""
    if exponent is None or exponent <= 0 or rho >= bar:
        return None
    return math.ceil(examples * ((1.0 - rho) / (1.0 - bar)) ** (1.0 / exponent))


def _not_sampled(run: Any, labs: Labs, configuration: Configuration) -> str:
    if not labs.enabled or not run.session.ready:
        return "the probes are off"
    if configuration.factor_args.use_empirical_fisher:
        return "the empirical Fisher samples no targets: its factors are the same at every seed"
    if configuration.factor_args.strategy == "identity":
        return "the identity strategy fits no factors"
    return ""


def _agreement(first: Any, second: Any, kind: str, columns: int | None = None) -> dict[str, float]:
    mine, theirs = second.scores(kind), first.scores(kind)
    if mine is None or theirs is None:
        return {"median_spearman": math.nan, "worst_spearman": math.nan, "top_overlap": math.nan}
    if columns is not None:
        mine, theirs = mine[..., :columns], theirs[..., :columns]
    return score_agreement(mine, theirs)


def _options(
    run: Any,
    labs: Labs,
    configuration: Configuration,
    other: Configuration,
    kind: str,
    result: SeedAgreement,
    bar: float,
) -> dict[str, dict[str, Any]]:
    """Each option measured on the probe (see the module)."""
    probe = labs.probe
    options: dict[str, dict[str, Any]] = {}
    empirical = changes.apply("set:factor_args.use_empirical_fisher=True", configuration)
    kinds = (kind,)
    against_true = _agreement(
        probe.trial(configuration, kinds), probe.trial(empirical, kinds, label="empirical Fisher"), kind
    )
    options["empirical_fisher"] = {
        "seed_median_spearman": 1.0,
        "against_true_fisher": against_true["median_spearman"],
        "note": "deterministic (no sampled targets): a different quantity, the gradient outer product at the data",
    }
    if configuration.score_args.damping_factor is not None:
        heuristic = changes.apply("damping:heuristic", configuration)
        other_heuristic = changes.apply("damping:heuristic", other)
        agreement = _agreement(
            probe.trial(heuristic, kinds), probe.trial(other_heuristic, kinds, label="second seed"), kind
        )
        options["damping_heuristic"] = {
            "seed_median_spearman": agreement["median_spearman"],
            "examples": probe.examples,
            "note": "kronfluence's 0.1 × mean eigenvalue per module: a modeling choice, not a repair",
        }
    needed = examples_for(bar, result.median_spearman, result.examples, result.exponent)
    options["more_examples"] = {
        "examples_for_bar": needed,
        "trend": [list(point) for point in result.trend],
        "note": "the covariance and Λ fitted on more examples (covariance_max_examples, lambda_max_examples, or the "
        "data set)",
    }
    return options
