"""The one place that calls kronfluence's stages: fit, eigendecompose, score, and load what was written.

Only the executor (`runner/executor.py`) calls these functions, for the run, the probes, the experiments
and the rungs alike, so a stage is called the same way wherever a verdict is reached, and a newcomer finds
every kronfluence call in one file. Each call overwrites its own output folder and gets fresh kronfluence
argument objects (kronfluence switches options off in the ones it is given), so nothing the doctor keeps
is changed by a call.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CALL_NAMES: dict[str, str] = {
    "covariance": "fit_covariance_matrices",
    "eigendecomposition": "perform_eigendecomposition",
    "lambda": "fit_lambda_matrices",
    "pairwise_scores": "compute_pairwise_scores",
    "self_scores": "compute_self_scores",
}
"""Stage → the kronfluence call that computes it (recorded on each stage and remedy)."""


def skipped_because(stage: str, strategy: str, kinds: tuple[str, ...]) -> str | None:
    """Why `stage` does not run for this strategy and these score kinds (None: it runs)."""
    from kronfluence.factor.config import FactorConfig

    config = FactorConfig.CONFIGS[strategy]
    needed = {
        "covariance": config.requires_covariance_matrices,
        "eigendecomposition": config.requires_eigendecomposition,
        "lambda": config.requires_lambda_matrices,
        "pairwise_scores": "pairwise" in kinds,
        "self_scores": "self" in kinds,
    }[stage]
    if needed:
        return None
    if stage in ("pairwise_scores", "self_scores"):
        return f"the pipeline does not ask for {stage.split('_')[0]} scores"
    return f"strategy {strategy!r} does not need it"


@contextmanager
def quiet_kronfluence() -> Iterator[None]:
    """kronfluence emits deprecation warnings from torch on every call; they are noise to our users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"kronfluence|torch")
        yield


@contextmanager
def task_in_force(analyzer: Any, task: Any) -> Iterator[None]:
    """kronfluence's Analyzer reads its Task at every call: the configuration's Task for the calls inside."""
    previous = analyzer.task
    analyzer.task = task
    try:
        yield
    finally:
        analyzer.task = previous


def fit_covariance(analyzer: Any, factors_name: str, dataset: Any, batch_size: int, factor_args: Any) -> None:
    """Covariance sums (also records the factor arguments when the strategy needs no covariance)."""
    with quiet_kronfluence():
        analyzer.fit_covariance_matrices(
            factors_name=factors_name,
            dataset=dataset,
            per_device_batch_size=batch_size,
            factor_args=factor_args.build(),
            overwrite_output_dir=True,
        )


def eigendecompose(analyzer: Any, factors_name: str, factor_args: Any, load_from: str | None = None) -> None:
    """Eigendecomposition; `load_from` names another factors folder whose covariances it starts from."""
    with quiet_kronfluence():
        analyzer.perform_eigendecomposition(
            factors_name=factors_name,
            factor_args=factor_args.build(),
            overwrite_output_dir=True,
            load_from_factors_name=load_from,
        )


def fit_lambda(
    analyzer: Any, factors_name: str, dataset: Any, batch_size: int, factor_args: Any, load_from: str | None = None
) -> None:
    """Λ; `load_from` names another factors folder whose eigendecomposition it starts from."""
    with quiet_kronfluence():
        analyzer.fit_lambda_matrices(
            factors_name=factors_name,
            dataset=dataset,
            per_device_batch_size=batch_size,
            factor_args=factor_args.build(),
            overwrite_output_dir=True,
            load_from_factors_name=load_from,
        )


def pairwise_scores(
    analyzer: Any,
    scores_name: str,
    factors_name: str,
    query_dataset: Any,
    train_dataset: Any,
    query_batch_size: int,
    train_batch_size: int,
    score_args: Any,
) -> None:
    with quiet_kronfluence():
        analyzer.compute_pairwise_scores(
            scores_name=scores_name,
            factors_name=factors_name,
            query_dataset=query_dataset,
            train_dataset=train_dataset,
            per_device_query_batch_size=query_batch_size,
            per_device_train_batch_size=train_batch_size,
            score_args=score_args.build(),
            overwrite_output_dir=True,
        )


def self_scores(
    analyzer: Any, scores_name: str, factors_name: str, train_dataset: Any, batch_size: int, score_args: Any
) -> None:
    with quiet_kronfluence():
        analyzer.compute_self_scores(
            scores_name=scores_name,
            factors_name=factors_name,
            train_dataset=train_dataset,
            per_device_train_batch_size=batch_size,
            score_args=score_args.build(),
            overwrite_output_dir=True,
        )


def load(analyzer: Any, stage: str, name: str) -> Any:
    """What `stage` wrote under `name` (a factors name, or a scores name for the score stages)."""
    loader = {
        "covariance": analyzer.load_covariance_matrices,
        "eigendecomposition": analyzer.load_eigendecomposition,
        "lambda": analyzer.load_lambda_matrices,
        "pairwise_scores": analyzer.load_pairwise_scores,
        "self_scores": analyzer.load_self_scores,
    }[stage]
    with quiet_kronfluence():
        return loader(name)
