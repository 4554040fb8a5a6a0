"""The pipeline a user declares: what to train, what to analyse and how kronfluence is configured."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

STAGES: tuple[str, ...] = (
    "train",
    "covariance",
    "eigendecomposition",
    "lambda",
    "pairwise_scores",
    "self_scores",
)
"""Stage names in pipeline order; fixed by the report format."""

INFLUENCE_STAGES: tuple[str, ...] = STAGES[1:]
FACTOR_STAGES: tuple[str, ...] = ("covariance", "eigendecomposition", "lambda")
SCORE_STAGE_OF: dict[str, str] = {"pairwise": "pairwise_scores", "self": "self_scores"}
"""Score kind → the stage that computes it."""

SCORE_KINDS: tuple[str, ...] = ("pairwise", "self")


@dataclass
class TrainingMonitor:
    """Records the training curve; the user's training loop calls :meth:`log` once per step.

    Kept dependency-free (plain floats) so that the train checks can read it without torch.
    """

    steps: list[int] = field(default_factory=list, metadata={"help": "Step index of each record."})
    loss: list[float] = field(default_factory=list, metadata={"help": "Training loss per step."})
    validation_loss: list[float | None] = field(
        default_factory=list, metadata={"help": "Validation loss per step, None where not measured."}
    )
    grad_norm: list[float | None] = field(
        default_factory=list, metadata={"help": "Global gradient norm per step, None where not measured."}
    )

    def log(
        self,
        loss: float,
        *,
        step: int | None = None,
        validation_loss: float | None = None,
        grad_norm: float | None = None,
    ) -> None:
        """Record one training step; tensors are accepted and converted to floats."""
        self.steps.append(len(self.steps) if step is None else int(step))
        self.loss.append(_as_float(loss))
        self.validation_loss.append(None if validation_loss is None else _as_float(validation_loss))
        self.grad_norm.append(None if grad_norm is None else _as_float(grad_norm))

    __call__ = log

    def to_dict(self) -> dict[str, list[Any]]:
        """Plain-list copy for the report (its strict-JSON writer turns inf/NaN into null with a reason)."""
        return {
            "steps": list(self.steps),
            "loss": list(self.loss),
            "validation_loss": list(self.validation_loss),
            "grad_norm": list(self.grad_norm),
        }


def _as_float(value: Any) -> float:
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().item()
    return float(value)


@dataclass
class Pipeline:
    """One influence analysis to run under the doctor, as declared by the user (SPEC section 3)."""

    name: str = field(metadata={"help": "Identifier used for report folders and test ids."})
    model: Callable[[], Any] | Any = field(
        metadata={"help": "Callable returning the nn.Module (trained, or trained by `train`), or the module."}
    )
    task: Any = field(metadata={"help": "A kronfluence.task.Task instance."})
    train_dataset: Callable[[], Any] | Any = field(
        metadata={"help": "Training Dataset, or a zero-argument callable returning it."}
    )
    query_dataset: Callable[[], Any] | Any = field(
        metadata={"help": "Query Dataset, or a zero-argument callable returning it."}
    )
    train: Callable[[Any, Any, TrainingMonitor], None] | None = field(
        default=None,
        metadata={"help": "Optional callable(model, train_dataset, monitor) that trains in place."},
    )
    factor_args: Any = field(default=None, metadata={"help": "kronfluence FactorArguments, used as given."})
    score_args: Any = field(default=None, metadata={"help": "kronfluence ScoreArguments, used as given."})
    scores: Sequence[str] = field(default=("pairwise", "self"), metadata={"help": "Which scores to compute."})
    batch_size: int = field(default=64, metadata={"help": "Per-device batch size for factors and train scores."})
    query_batch_size: int = field(default=8, metadata={"help": "Per-device batch size for query gradients."})
    seed: int = field(default=0, metadata={"help": "Seed for every random number generator the run touches."})
    query_labels: Sequence[str] | None = field(
        default=None, metadata={"help": "Optional human-readable text of each query, for reports."}
    )
    train_labels: Sequence[str] | None = field(
        default=None, metadata={"help": "Optional human-readable text of each training example, for reports."}
    )
    dataloader_kwargs: Any = field(
        default=None,
        metadata={
            "help": "Optional kronfluence DataLoaderKwargs (or a dict of its fields), e.g. collate_fn="
            "transformers.default_data_collator: given to the Analyzer, and its collate_fn to the doctor's own "
            "passes over the data."
        },
    )

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("Pipeline.name must be a non-empty string.")
        unknown = [kind for kind in self.scores if kind not in SCORE_KINDS]
        if unknown:
            raise ValueError(f"Pipeline.scores has unknown kinds {unknown}; choose from {list(SCORE_KINDS)}.")
        if self.batch_size <= 0 or self.query_batch_size <= 0:
            raise ValueError("Pipeline.batch_size and query_batch_size must be positive.")
        if self.factor_args is None or self.score_args is None:
            from kronfluence.arguments import FactorArguments, ScoreArguments

            if self.factor_args is None:
                self.factor_args = FactorArguments()
            if self.score_args is None:
                self.score_args = ScoreArguments()
        if self.dataloader_kwargs is not None:
            self.dataloader_kwargs = _dataloader_kwargs(self.dataloader_kwargs)

    @property
    def collate(self) -> Callable[[list[Any]], Any]:
        """How the user's batches are put together: their collate_fn, else torch's default."""
        from torch.utils.data import default_collate

        custom = getattr(self.dataloader_kwargs, "collate_fn", None)
        return custom if custom is not None else default_collate


def _dataloader_kwargs(value: Any) -> Any:
    """A kronfluence DataLoaderKwargs as given, or built from a dict of its fields."""
    from kronfluence.utils.dataset import DataLoaderKwargs

    if isinstance(value, DataLoaderKwargs):
        return value
    if isinstance(value, dict):
        try:
            return DataLoaderKwargs(**value)
        except TypeError as exc:
            raise ValueError(f"Pipeline.dataloader_kwargs: {exc}; see kronfluence's DataLoaderKwargs.") from None
    raise ValueError(
        f"Pipeline.dataloader_kwargs must be a kronfluence DataLoaderKwargs or a dict, not {type(value).__name__}."
    )


def resolve(value: Any) -> Any:
    """Return `value()` for the lazy fields (model, datasets) and the value itself otherwise."""
    import torch

    if isinstance(value, (torch.nn.Module, torch.utils.data.Dataset)):
        return value
    return value() if callable(value) else value
