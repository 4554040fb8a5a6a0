"""Read what kronfluence wrote to disk (factors, eigendecomposition, Lambda, scores) without the model.

Nothing here writes: safetensors files are opened read-only and JSON files are read as text, so a folder
under inspection is left byte for byte as it was. File names come from kronfluence's own path functions.
Partitioned output that was never aggregated is merged exactly as kronfluence's `aggregate_*` methods do.
Anything malformed is a UsageError naming the file: bad input, reported in one sentence.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.factor.config import FactorConfig
from kronfluence.factor.covariance import covariance_matrices_save_path
from kronfluence.factor.eigen import eigendecomposition_save_path, lambda_matrices_save_path
from kronfluence.score.pairwise import pairwise_scores_save_path
from kronfluence.score.self import self_scores_save_path
from kronfluence.utils.constants import (
    ACTIVATION_COVARIANCE_MATRIX_NAME,
    ACTIVATION_EIGENVALUES_NAME,
    ACTIVATION_EIGENVECTORS_NAME,
    COVARIANCE_FACTOR_NAMES,
    EIGENDECOMPOSITION_FACTOR_NAMES,
    FACTOR_ARGUMENTS_NAME,
    FACTOR_SAVE_PREFIX,
    GRADIENT_COVARIANCE_MATRIX_NAME,
    GRADIENT_EIGENVALUES_NAME,
    GRADIENT_EIGENVECTORS_NAME,
    LAMBDA_FACTOR_NAMES,
    LAMBDA_MATRIX_NAME,
    NUM_ACTIVATION_COVARIANCE_PROCESSED,
    NUM_GRADIENT_COVARIANCE_PROCESSED,
    NUM_LAMBDA_PROCESSED,
    SCORE_ARGUMENTS_NAME,
    SCORE_SAVE_PREFIX,
)
from safetensors import safe_open

from influence_doctor.errors import UsageError

Tensors = dict[str, torch.Tensor]
Partition = tuple[int, int]

FACTOR_ARGUMENTS_FILE = f"{FACTOR_ARGUMENTS_NAME}_arguments.json"
SCORE_ARGUMENTS_FILE = f"{SCORE_ARGUMENTS_NAME}_arguments.json"
FACTOR_STAGES: dict[str, tuple[str, ...]] = {
    "covariance": tuple(COVARIANCE_FACTOR_NAMES),
    "eigendecomposition": tuple(EIGENDECOMPOSITION_FACTOR_NAMES),
    "lambda": tuple(LAMBDA_FACTOR_NAMES),
}
SCORE_STAGES: tuple[str, ...] = ("pairwise_scores", "self_scores")
_SCORE_PATHS: dict[str, Callable[..., Path]] = {
    "pairwise_scores": pairwise_scores_save_path,
    "self_scores": self_scores_save_path,
}
_SCORE_CONCAT_DIM = {"pairwise_scores": 1, "self_scores": 0}  # the train dimension, as kronfluence cats it
_SCORE_NDIM = {"pairwise_scores": 2, "self_scores": 1}
_NEEDS = {
    "covariance": "requires_covariance_matrices",
    "eigendecomposition": "requires_eigendecomposition",
    "lambda": "requires_lambda_matrices",
}


@dataclass
class Source:
    """One kronfluence folder (`factors_<name>` or `scores_<name>`) and everything read from it."""

    kind: str  # "factors" or "scores"
    directory: Path
    factor_args: FactorArguments
    score_args: ScoreArguments | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)  # stage -> kronfluence's loaded dict
    partitions: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> how it was merged
    files: list[str] = field(default_factory=list)  # every file read, relative to `directory`
    ignored_arguments: list[str] = field(default_factory=list)

    @property
    def folder(self) -> str:
        return self.directory.name

    @property
    def name(self) -> str:
        """The name kronfluence was given (`factors_name` / `scores_name`)."""
        prefix = FACTOR_SAVE_PREFIX if self.kind == "factors" else SCORE_SAVE_PREFIX
        return self.folder.removeprefix(prefix)

    def needs(self, stage: str) -> bool:
        """Whether this source's strategy computes `stage` at all (lambda is not needed by kfac)."""
        return bool(getattr(FactorConfig.CONFIGS[self.factor_args.strategy], _NEEDS[stage]))


def read_path(
    path: str | Path, factors: Sequence[str] | None = None, scores: Sequence[str] | None = None
) -> list[Source]:
    """Every factors and scores folder at `path` (an analysis, factors or scores folder), read and checked.

    `factors` / `scores` pick folders by name inside an analysis folder; when either is given, only the
    named folders are read.
    """
    with _quiet():
        return [read_source(kind, directory) for kind, directory in locate(Path(path), factors, scores)]


def locate(
    path: Path, factors: Sequence[str] | None = None, scores: Sequence[str] | None = None
) -> list[tuple[str, Path]]:
    """Which folders to read, as (kind, directory) pairs: factors first, then scores, each sorted."""
    if not path.exists():
        raise UsageError(f"{path} does not exist.")
    if not path.is_dir():
        raise UsageError(f"{path} is a file; inspect takes a kronfluence analysis, factors or scores folder.")
    kind = folder_kind(path)
    if kind is not None:
        if factors or scores:
            raise UsageError(
                f"--factors and --scores pick folders inside an analysis folder, but {path} is itself a {kind} folder."
            )
        return [(kind, path)]
    found = {
        "factors": _children(path, FACTOR_SAVE_PREFIX),
        "scores": _children(path, SCORE_SAVE_PREFIX),
    }
    if not found["factors"] and not found["scores"]:
        raise UsageError(
            f"{path} is not kronfluence output: it holds no {FACTOR_SAVE_PREFIX}*/ or {SCORE_SAVE_PREFIX}*/ "
            f"folder and no {FACTOR_ARGUMENTS_FILE} (give the analysis folder <output_dir>/<analysis_name>)."
        )
    if factors or scores:
        found = {
            "factors": _pick(path, "factors", found["factors"], factors or []),
            "scores": _pick(path, "scores", found["scores"], scores or []),
        }
    return [(kind, directory) for kind in ("factors", "scores") for directory in found[kind]]


def folder_kind(directory: Path) -> str | None:
    """Whether `directory` itself is a scores or a factors folder ("scores", "factors"), else None."""
    names = _file_names(directory)
    if SCORE_ARGUMENTS_FILE in names or any(_is_data_file(n, SCORE_STAGES) for n in names):
        return "scores"
    factor_names = [name for stage in FACTOR_STAGES.values() for name in stage]
    if FACTOR_ARGUMENTS_FILE in names or any(_is_data_file(n, factor_names) for n in names):
        return "factors"
    return None


def _file_names(directory: Path) -> set[str]:
    try:
        return {entry.name for entry in directory.iterdir() if entry.is_file()}
    except OSError as exc:
        raise UsageError(f"{directory} cannot be listed ({_reason(exc)}).") from None


def _is_data_file(name: str, stems: Iterable[str]) -> bool:
    return name.endswith(".safetensors") and any(
        name == f"{stem}.safetensors" or name.startswith(f"{stem}_data_partition") for stem in stems
    )


def _children(path: Path, prefix: str) -> list[Path]:
    try:
        return sorted(child for child in path.iterdir() if child.is_dir() and child.name.startswith(prefix))
    except OSError as exc:
        raise UsageError(f"{path} cannot be listed ({_reason(exc)}).") from None


def _pick(path: Path, kind: str, available: list[Path], wanted: Sequence[str]) -> list[Path]:
    prefix = FACTOR_SAVE_PREFIX if kind == "factors" else SCORE_SAVE_PREFIX
    by_name = {directory.name.removeprefix(prefix): directory for directory in available}
    picked = []
    for name in wanted:
        name = name.removeprefix(prefix)
        if name not in by_name:
            have = ", ".join(sorted(by_name)) or "none"
            raise UsageError(f"{path} has no {prefix}{name}/ folder ({kind} names there: {have}).")
        if by_name[name] not in picked:
            picked.append(by_name[name])
    return picked


def read_source(kind: str, directory: Path) -> Source:
    """Read one factors or scores folder: its arguments and every stage whose files are there."""
    factor_args, ignored = read_arguments(directory / FACTOR_ARGUMENTS_FILE, FactorArguments)
    source = Source(kind=kind, directory=directory, factor_args=factor_args, ignored_arguments=ignored)
    if kind == "scores":
        source.score_args, more = read_arguments(directory / SCORE_ARGUMENTS_FILE, ScoreArguments)
        source.ignored_arguments += more
        for stage in SCORE_STAGES:
            _read_score_stage(source, stage)
    else:
        for stage in FACTOR_STAGES:
            _read_factor_stage(source, stage)
        _check_across_stages(source)
    return source


# --- arguments -----------------------------------------------------------------------------------------


def read_arguments(file: Path, kind: type) -> tuple[Any, list[str]]:
    """Rebuild kronfluence's FactorArguments / ScoreArguments from the JSON it saved.

    Keys this kronfluence does not know (written by another version) are dropped and returned, so that a
    folder from a neighbouring version can still be inspected.
    """
    if not file.is_file():
        raise UsageError(f"{file} is missing; kronfluence writes it into every factors and scores folder.")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{file} is not readable JSON ({_reason(exc)}).") from None
    if not isinstance(data, dict):
        raise UsageError(f"{file} does not hold a JSON object of {kind.__name__}.")
    known = {f.name for f in fields(kind)}
    values = {key: _from_json(file, key, value) for key, value in data.items() if key in known}
    try:
        arguments = kind(**values)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{file} does not hold valid {kind.__name__} ({_reason(exc)}).") from None
    if isinstance(arguments, FactorArguments) and arguments.strategy not in FactorConfig.CONFIGS:
        raise UsageError(f"{file} names an unknown strategy {arguments.strategy!r}.")
    return arguments, sorted(set(data) - known)


def _from_json(file: Path, key: str, value: Any) -> Any:
    """kronfluence saves dtypes as "torch.float16": turn those strings back into torch dtypes."""
    if isinstance(value, str) and value.startswith("torch."):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if not isinstance(dtype, torch.dtype):
            raise UsageError(f"{file} gives {key} an unknown dtype {value!r}.")
        return dtype
    return value


# --- safetensors ---------------------------------------------------------------------------------------


def load_tensors(file: Path) -> Tensors:
    """All tensors of one safetensors file, opened read-only; a damaged file is a UsageError naming it."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises its own error type, OSError or others: all mean unreadable
        raise UsageError(f"{file} is truncated or corrupt: not a readable safetensors file ({_reason(exc)}).") from None
    if not tensors:
        raise UsageError(f"{file} holds no tensors.")
    return tensors


# --- factor stages -------------------------------------------------------------------------------------


def _factor_path(stage: str, directory: Path, name: str, partition: Partition | None) -> Path:
    if stage == "covariance":
        return covariance_matrices_save_path(output_dir=directory, factor_name=name, partition=partition)
    if stage == "lambda":
        return lambda_matrices_save_path(output_dir=directory, factor_name=name, partition=partition)
    return eigendecomposition_save_path(output_dir=directory, factor_name=name)


def _partition_counts(source: Source, stage: str) -> tuple[int, int]:
    fa, sa = source.factor_args, source.score_args
    if stage == "covariance":
        return fa.covariance_data_partitions, fa.covariance_module_partitions
    if stage == "lambda":
        return fa.lambda_data_partitions, fa.lambda_module_partitions
    if stage in SCORE_STAGES and sa is not None:
        return sa.data_partitions, sa.module_partitions
    return 1, 1


def _read_factor_stage(source: Source, stage: str) -> None:
    """Aggregated files when all are there (what kronfluence loads), else the merged partition files."""
    names = FACTOR_STAGES[stage]
    whole = {name: _factor_path(stage, source.directory, name, None) for name in names}
    if all(file.is_file() for file in whole.values()):
        source.artifacts[stage] = _load_factor_group(source, stage, whole)
        return
    partitions = _present_partitions(source, stage) if stage != "eigendecomposition" else []
    if partitions:
        source.artifacts[stage] = _merge_factor_partitions(source, stage, partitions)
        return
    present = [file for file in whole.values() if file.is_file()]
    if present:
        missing = next(file for file in whole.values() if not file.is_file())
        raise UsageError(f"{missing} is missing, while {present[0].name} is there.")


def _present_partitions(source: Source, stage: str) -> list[Partition]:
    """Partitions (within the configured counts) with at least one file; each must then have them all."""
    data, module = _partition_counts(source, stage)
    if data == 1 and module == 1:
        return []
    present = []
    for partition in ((i, j) for i in range(data) for j in range(module)):
        files = _partition_files(source, stage, partition)
        if any(file.is_file() for file in files):
            if missing := [file for file in files if not file.is_file()]:
                raise UsageError(f"{missing[0]} is missing, while other files of its partition are there.")
            present.append(partition)
    if present:
        source.partitions[stage] = {
            "data_partitions": data,
            "module_partitions": module,
            "merged": [list(partition) for partition in present],
            "complete": len(present) == data * module,
        }
    return present


def _partition_files(source: Source, stage: str, partition: Partition) -> list[Path]:
    if stage in SCORE_STAGES:
        return [_SCORE_PATHS[stage](output_dir=source.directory, partition=partition)]
    return [_factor_path(stage, source.directory, name, partition) for name in FACTOR_STAGES[stage]]


def _load_factor_group(source: Source, stage: str, files: dict[str, Path]) -> dict[str, Tensors]:
    group = {name: _load(source, file) for name, file in files.items()}
    _FACTOR_CHECKS[stage](group, files)
    return group


def _merge_factor_partitions(source: Source, stage: str, partitions: list[Partition]) -> dict[str, Tensors]:
    """Sum every partition into zeros, per factor and module, as `FactorComputer._aggregate_factors` does.

    Data partitions hold partial sums of the same modules; module partitions hold disjoint modules.
    """
    merged: dict[str, Tensors] = {}
    for partition in partitions:
        files = {name: _factor_path(stage, source.directory, name, partition) for name in FACTOR_STAGES[stage]}
        group = _load_factor_group(source, stage, files)
        for name, per_module in group.items():
            target = merged.setdefault(name, {})
            for module, tensor in per_module.items():
                if module not in target:
                    target[module] = torch.zeros_like(tensor, requires_grad=False)
                elif target[module].shape != tensor.shape:
                    raise UsageError(
                        f"{files[name]} holds module {module!r} as {_shape(tensor)}, but another partition "
                        f"holds it as {_shape(target[module])}."
                    )
                target[module].add_(tensor)
    return merged


def _whole_files(source: Source, stage: str) -> dict[str, Path]:
    """The files a stage was read from: the aggregated ones, or the first partition's when merged."""
    merged = source.partitions.get(stage, {}).get("merged")
    partition = tuple(merged[0]) if merged else None
    return {name: _factor_path(stage, source.directory, name, partition) for name in FACTOR_STAGES[stage]}


def _load(source: Source, file: Path) -> Tensors:
    tensors = load_tensors(file)
    source.files.append(str(file.relative_to(source.directory)))
    return tensors


# --- score stages --------------------------------------------------------------------------------------


def _read_score_stage(source: Source, stage: str) -> None:
    whole = _SCORE_PATHS[stage](output_dir=source.directory)
    if whole.is_file():
        scores = _load(source, whole)
        _check_scores(source, stage, scores, whole)
        source.artifacts[stage] = scores
        return
    partitions = _present_partitions(source, stage)
    if partitions:
        source.artifacts[stage] = _merge_score_partitions(source, stage, partitions)


def _merge_score_partitions(source: Source, stage: str, partitions: list[Partition]) -> Tensors:
    """As `ScoreComputer._aggregate_scores`: sum module partitions, then join data partitions along the
    train dimension (or sum them when train gradients were aggregated)."""
    assert source.score_args is not None
    merged: Tensors = {}
    for data in sorted({i for i, _ in partitions}):
        per_data: Tensors = {}
        for partition in (p for p in partitions if p[0] == data):
            file = _SCORE_PATHS[stage](output_dir=source.directory, partition=partition)
            scores = _load(source, file)
            _check_scores(source, stage, scores, file)
            for module, tensor in scores.items():
                if module not in per_data:
                    per_data[module] = torch.zeros_like(tensor, requires_grad=False)
                elif per_data[module].shape != tensor.shape:
                    raise UsageError(
                        f"{file} holds {module!r} scores of shape {_shape(tensor)}, but another module "
                        f"partition of data partition {data} holds {_shape(per_data[module])}."
                    )
                per_data[module].add_(tensor)
        for module, tensor in per_data.items():
            if module not in merged:
                merged[module] = tensor.clone()
            elif source.score_args.aggregate_train_gradients:
                merged[module].add_(tensor)
            elif stage == "pairwise_scores" and merged[module].shape[0] != tensor.shape[0]:
                file = _SCORE_PATHS[stage](output_dir=source.directory, partition=(data, 0))
                raise UsageError(
                    f"{file} holds {module!r} scores for {tensor.shape[0]} queries, but earlier data "
                    f"partitions hold {merged[module].shape[0]}."
                )
            else:
                merged[module] = torch.cat((merged[module], tensor), dim=_SCORE_CONCAT_DIM[stage])
    return merged


def _check_scores(source: Source, stage: str, scores: Tensors, file: Path) -> None:
    """Pairwise scores are queries × train, self scores one per train example; per-token adds a dimension."""
    per_token = source.score_args is not None and source.score_args.compute_per_token_scores
    ndim = _SCORE_NDIM[stage] + int(per_token)
    shapes = set()
    for module, tensor in scores.items():
        if tensor.dim() != ndim or not tensor.is_floating_point():
            kind = "queries × training examples" if stage == "pairwise_scores" else "one per training example"
            token = " × tokens" if per_token else ""
            raise UsageError(
                f"{file} holds {module!r} as {_shape(tensor)} {tensor.dtype}, not floating scores ({kind}{token})."
            )
        shapes.add(tuple(tensor.shape))
    if len(shapes) > 1:
        raise UsageError(f"{file} holds scores of different shapes ({', '.join(map(str, sorted(shapes)))}).")


# --- shape checks: a tensor of the wrong shape is bad input, not a numerical finding ----------------------


def _check_covariance(group: dict[str, Tensors], files: dict[str, Path]) -> None:
    for matrix, count in (
        (ACTIVATION_COVARIANCE_MATRIX_NAME, NUM_ACTIVATION_COVARIANCE_PROCESSED),
        (GRADIENT_COVARIANCE_MATRIX_NAME, NUM_GRADIENT_COVARIANCE_PROCESSED),
    ):
        for module, tensor in group[matrix].items():
            _require_square(tensor, files[matrix], module)
        _require_counts(group, files, matrix, count)
    _require_same_modules(group, files, ACTIVATION_COVARIANCE_MATRIX_NAME, GRADIENT_COVARIANCE_MATRIX_NAME)


def _check_eigendecomposition(group: dict[str, Tensors], files: dict[str, Path]) -> None:
    for vectors, values in (
        (ACTIVATION_EIGENVECTORS_NAME, ACTIVATION_EIGENVALUES_NAME),
        (GRADIENT_EIGENVECTORS_NAME, GRADIENT_EIGENVALUES_NAME),
    ):
        _require_same_modules(group, files, vectors, values)
        for module, matrix in group[vectors].items():
            _require_square(matrix, files[vectors], module)
            spectrum = group[values][module]
            if spectrum.dim() != 1 or spectrum.shape[0] != matrix.shape[0]:
                raise UsageError(
                    f"{files[values]} holds {_shape(spectrum)} eigenvalues for module {module!r}, but "
                    f"its eigenvectors are {_shape(matrix)}."
                )
    _require_same_modules(group, files, ACTIVATION_EIGENVECTORS_NAME, GRADIENT_EIGENVECTORS_NAME)


def _check_lambda(group: dict[str, Tensors], files: dict[str, Path]) -> None:
    for module, tensor in group[LAMBDA_MATRIX_NAME].items():
        if tensor.dim() != 2:
            raise UsageError(f"{files[LAMBDA_MATRIX_NAME]} holds module {module!r} as {_shape(tensor)}, not a matrix.")
    _require_counts(group, files, LAMBDA_MATRIX_NAME, NUM_LAMBDA_PROCESSED)


_FACTOR_CHECKS: dict[str, Callable[[dict[str, Tensors], dict[str, Path]], None]] = {
    "covariance": _check_covariance,
    "eigendecomposition": _check_eigendecomposition,
    "lambda": _check_lambda,
}


def _require_square(tensor: torch.Tensor, file: Path, module: str) -> None:
    if tensor.dim() != 2 or tensor.shape[0] != tensor.shape[1]:
        raise UsageError(f"{file} holds module {module!r} as {_shape(tensor)}, not a square matrix.")


def _require_counts(group: dict[str, Tensors], files: dict[str, Path], matrix: str, count: str) -> None:
    """Every matrix needs its examples-processed count: the sums mean nothing without it."""
    _require_same_modules(group, files, matrix, count)
    for module, tensor in group[count].items():
        if tensor.numel() != 1:
            raise UsageError(f"{files[count]} holds {_shape(tensor)} for module {module!r}, not one count.")


def _require_same_modules(group: dict[str, Tensors], files: dict[str, Path], first: str, second: str) -> None:
    for this, other in ((first, second), (second, first)):
        absent = sorted(set(group[this]) - set(group[other]))
        if absent:
            raise UsageError(f"{files[other]} has no entry for module {absent[0]!r}, which {files[this].name} has.")


def _check_across_stages(source: Source) -> None:
    """Eigenvectors must fit the covariance they came from, Lambda the eigenbasis it was fitted in."""
    covariance = source.artifacts.get("covariance")
    eigen = source.artifacts.get("eigendecomposition")
    if eigen is None:
        return
    files = _whole_files(source, "eigendecomposition")
    if covariance is not None:
        for matrix, vectors in (
            (ACTIVATION_COVARIANCE_MATRIX_NAME, ACTIVATION_EIGENVECTORS_NAME),
            (GRADIENT_COVARIANCE_MATRIX_NAME, GRADIENT_EIGENVECTORS_NAME),
        ):
            for module, basis in eigen[vectors].items():
                other = covariance[matrix].get(module)
                if other is not None and other.shape != basis.shape:
                    raise UsageError(
                        f"{files[vectors]} holds {_shape(basis)} eigenvectors for module {module!r}, but "
                        f"its {matrix.replace('_', ' ')} is {_shape(other)}."
                    )
    lambdas = source.artifacts.get("lambda")
    if lambdas is None or not FactorConfig.CONFIGS[source.factor_args.strategy].requires_eigendecomposition_for_lambda:
        return
    for module, matrix in lambdas[LAMBDA_MATRIX_NAME].items():
        if module not in eigen[ACTIVATION_EIGENVECTORS_NAME]:
            continue
        expected = (
            eigen[GRADIENT_EIGENVECTORS_NAME][module].shape[0],
            eigen[ACTIVATION_EIGENVECTORS_NAME][module].shape[0],
        )
        if tuple(matrix.shape) != expected:
            file = _whole_files(source, "lambda")[LAMBDA_MATRIX_NAME]
            raise UsageError(
                f"{file} holds {_shape(matrix)} for module {module!r}, but its eigenbasis needs "
                f"{expected[0]}×{expected[1]}."
            )


# --- helpers -------------------------------------------------------------------------------------------


def _shape(tensor: torch.Tensor) -> str:
    return "×".join(str(n) for n in tensor.shape) if tensor.dim() else "a scalar"


def _reason(exc: BaseException) -> str:
    """An exception's message on one line, without a trailing period (it goes inside a sentence)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.rstrip(".")


@contextmanager
def _quiet() -> Iterator[None]:
    """Library warnings would add stderr lines to what must stay a one-line error or a clean report."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
