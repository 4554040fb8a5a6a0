"""`influence-doctor inspect`: real kronfluence output read back from disk, checked, and never modified."""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from safetensors.torch import load_file, save_file
from torch.utils.data import TensorDataset

from influence_doctor import STAGES
from influence_doctor.cli import main
from influence_doctor.demos.uci_mlp import RegressionTask
from influence_doctor.errors import UsageError
from influence_doctor.inspect import inspect_path, read_path
from tests.pipelines import build_small_mlp, regression_data

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # kronfluence's own torch.cuda.amp notices

FACTORS, PAIRWISE, SELF = "ekfac", "ekfac_pairwise", "ekfac_self"
AGGREGATED = (
    "factors_ekfac/activation_covariance.safetensors",
    "factors_ekfac/gradient_covariance.safetensors",
    "factors_ekfac/num_activation_covariance_processed.safetensors",
    "factors_ekfac/num_gradient_covariance_processed.safetensors",
    "factors_ekfac/lambda_matrix.safetensors",
    "factors_ekfac/num_lambda_processed.safetensors",
    "scores_ekfac_pairwise/pairwise_scores.safetensors",
    "scores_ekfac_self/self_scores.safetensors",
)


def _scaled(dataset: TensorDataset, scale: float) -> TensorDataset:
    x, y = dataset.tensors
    return TensorDataset(x * scale, y)


def _analyse(
    root: Path,
    name: str,
    factor_args: FactorArguments,
    score_args: ScoreArguments | None = None,
    scale: float = 1.0,
) -> Path:
    """kronfluence's real pipeline on a tiny MLP; covariance only when `score_args` is None."""
    # kronfluence runs gc.collect() around every partition; with the test session's objects frozen out of
    # the collector's reach those collections take milliseconds instead of a fifth of a second each.
    gc.freeze()
    try:
        return _run_kronfluence(root, name, factor_args, score_args, scale)
    finally:
        gc.unfreeze()


def _run_kronfluence(
    root: Path, name: str, factor_args: FactorArguments, score_args: ScoreArguments | None, scale: float
) -> Path:
    task = RegressionTask()
    analyzer = Analyzer(
        name, prepare_model(build_small_mlp(), task), task, cpu=True, output_dir=str(root), disable_tqdm=True
    )
    train = _scaled(regression_data(64), scale)
    if score_args is None:
        analyzer.fit_covariance_matrices(FACTORS, dataset=train, per_device_batch_size=16, factor_args=factor_args)
        return root / name
    analyzer.fit_all_factors(FACTORS, dataset=train, per_device_batch_size=16, factor_args=factor_args)
    batches = {"per_device_train_batch_size": 16, "score_args": score_args}
    analyzer.compute_pairwise_scores(
        scores_name=PAIRWISE,
        factors_name=FACTORS,
        query_dataset=_scaled(regression_data(4, seed=1), scale),
        train_dataset=train,
        per_device_query_batch_size=4,
        **batches,
    )
    analyzer.compute_self_scores(scores_name=SELF, factors_name=FACTORS, train_dataset=train, **batches)
    return root / name


@pytest.fixture(scope="module")
def healthy(tmp_path_factory) -> Path:
    # Empirical Fisher makes the covariances deterministic, so the partitioned run can be compared exactly.
    args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
    return _analyse(tmp_path_factory.mktemp("healthy"), "small", args, ScoreArguments(damping_factor=None))


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory) -> Path:
    """The same analysis in 2×2 partitions; kronfluence aggregates them once all are done."""
    args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=True,
        covariance_data_partitions=2,
        covariance_module_partitions=2,
        lambda_data_partitions=2,
        lambda_module_partitions=2,
    )
    scores = ScoreArguments(damping_factor=None, data_partitions=2, module_partitions=2)
    return _analyse(tmp_path_factory.mktemp("partitioned"), "small", args, scores)


@pytest.fixture(scope="module")
def overflowed(tmp_path_factory) -> Path:
    """fp16 covariance sums of inputs ×100 pass 65504: the seeds' failure (eigh then refuses them)."""
    args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=True,
        activation_covariance_dtype=torch.float16,
        gradient_covariance_dtype=torch.float16,
    )
    return _analyse(tmp_path_factory.mktemp("fp16"), "small", args, scale=100.0)


@pytest.fixture
def unaggregated(partitioned, tmp_path) -> Path:
    """A copy of the partitioned analysis as it is before kronfluence aggregates: partition files only."""
    copy = shutil.copytree(partitioned, tmp_path / "small")
    for relative in AGGREGATED:
        (copy / relative).unlink()
    return copy


def _inspect_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["inspect", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _stages(document: dict) -> dict[str, dict]:
    return {stage["name"]: stage for stage in document["stages"]}


def _snapshot(root: Path) -> dict[str, tuple[int, str] | None]:
    """Every path under `root`, with size and sha256 for files: any write at all changes it."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
        if path.is_file()
        else None
        for path in sorted(root.rglob("*"))
    }


# --- healthy output ------------------------------------------------------------------------------------


def test_healthy_analysis_json_through_the_real_command(cli, healthy):
    done = cli("inspect", str(healthy), "--format", "json")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["status"] == "healthy"
    assert {"schema_version", "tool", "status", "stages", "path"} <= set(document)
    assert document["factors_names"] == [FACTORS]
    assert document["scores_names"] == [PAIRWISE, SELF]
    stages = _stages(document)
    assert list(stages) == list(STAGES)
    assert stages["train"]["status"] == "not-run"
    for name in STAGES[1:]:
        assert stages[name]["status"] == "ok", stages[name]["findings"]
        assert stages[name]["seconds"] is None
    covariance = stages["covariance"]["metrics"]["factors_ekfac"]
    assert covariance["stored"]["activation_covariance"]["0"] == {"shape": [5, 5], "dtype": "float32"}
    eigen = stages["eigendecomposition"]["metrics"]["factors_ekfac"]
    assert eigen["stored"]["gradient_eigenvalues"]["0"] == {"shape": [8], "dtype": "float32"}
    pairwise = stages["pairwise_scores"]["metrics"]["scores_ekfac_pairwise"]["summary"]
    assert pairwise["shape"] == [4, 64] and pairwise["finite_fraction"] == 1.0
    assert stages["self_scores"]["metrics"]["scores_ekfac_self"]["summary"]["shape"] == [64]
    paired = {source["folder"]: source.get("paired_factors") for source in document["sources"]}
    assert paired == {
        "factors_ekfac": None,
        "scores_ekfac_pairwise": "factors_ekfac",
        "scores_ekfac_self": "factors_ekfac",
    }


def test_text_and_markdown_output(capsys, healthy):
    code, out, err = _inspect_cli(capsys, str(healthy))
    assert (code, err) == (0, "")
    assert "Status: HEALTHY" in out
    for name in STAGES:
        assert name in out
    code, out, _ = _inspect_cli(capsys, str(healthy), "--format", "md")
    assert code == 0 and out.startswith("# influence-doctor inspect:") and "| stage" in out


def test_single_factors_and_scores_folders(capsys, healthy):
    code, out, _ = _inspect_cli(capsys, str(healthy / "factors_ekfac"), "--format", "json")
    stages = _stages(json.loads(out))
    assert code == 0
    assert [stages[s]["status"] for s in ("covariance", "eigendecomposition", "lambda")] == ["ok"] * 3
    assert stages["pairwise_scores"]["status"] == "not-run"
    code, out, _ = _inspect_cli(capsys, str(healthy / "scores_ekfac_self"), "--format", "json")
    stages = _stages(json.loads(out))
    assert code == 0 and stages["self_scores"]["status"] == "ok"
    assert stages["covariance"]["status"] == "not-run"


def test_picking_folders_by_name(capsys, healthy):
    code, out, _ = _inspect_cli(capsys, str(healthy), "--scores", "ekfac_self", "--format", "json")
    document = json.loads(out)
    assert code == 0
    assert (document["factors_names"], document["scores_names"]) == ([], [SELF])
    code, _, err = _inspect_cli(capsys, str(healthy), "--factors", "nope")
    assert code == 2 and "factors_nope" in err and "ekfac" in err


def test_strategy_without_lambda_marks_it_skipped(tmp_path, healthy):
    copy = shutil.copytree(healthy / "factors_ekfac", tmp_path / "factors_kfac")
    arguments = json.loads((copy / "factor_arguments.json").read_text())
    (copy / "factor_arguments.json").write_text(json.dumps({**arguments, "strategy": "kfac"}))
    for name in ("lambda_matrix", "num_lambda_processed"):
        (copy / f"{name}.safetensors").unlink()
    stages = _stages(inspect_path(copy))
    assert stages["lambda"]["status"] == "skipped"
    assert stages["covariance"]["status"] == "ok"


# --- fp16 overflow -------------------------------------------------------------------------------------


def test_reader_keeps_the_fp16_sums_as_stored(overflowed):
    (source,) = read_path(overflowed)
    assert source.factor_args.activation_covariance_dtype == torch.float16  # rebuilt from "torch.float16"
    activation = source.artifacts["covariance"]["activation_covariance"]
    assert {tensor.dtype for tensor in activation.values()} == {torch.float16}
    assert torch.isinf(activation["0"]).any()
    stored = load_file(overflowed / "factors_ekfac" / "activation_covariance.safetensors")
    torch.testing.assert_close(activation["0"], stored["0"], equal_nan=True)


def test_fp16_overflow_is_sick(capsys, overflowed):
    code, out, _ = _inspect_cli(capsys, str(overflowed), "--format", "json")
    assert code == 1
    document = json.loads(out)
    assert document["status"] == "sick"
    stages = _stages(document)
    assert stages["covariance"]["status"] == "fail"
    stored = stages["covariance"]["metrics"]["factors_ekfac"]["stored"]
    assert stored["activation_covariance"]["0"]["dtype"] == "float16"
    finite = [f for f in stages["covariance"]["findings"] if f["check"] == "covariance.finite"]
    assert finite and all(f["severity"] == "fail" for f in finite)
    assert finite[0]["cause"] == "fp16-overflow"
    assert [(p["cause"], p["stage"]) for p in document["diagnosis"]] == [("fp16-overflow", "covariance")]
    assert stages["covariance"]["problems"][0]["cause"] == "fp16-overflow"
    assert stages["eigendecomposition"]["status"] == "not-run"  # kronfluence never got past eigh
    assert "no eigendecomposition" in stages["eigendecomposition"]["reason"]


def test_several_factors_folders_are_all_read_and_told_apart(tmp_path, healthy, overflowed):
    copy = shutil.copytree(healthy, tmp_path / "small")
    shutil.copytree(overflowed / "factors_ekfac", copy / "factors_fp16")
    document = inspect_path(copy)
    assert document["status"] == "sick" and document["factors_names"] == [FACTORS, "fp16"]
    covariance = _stages(document)["covariance"]
    assert covariance["sources"] == ["factors_ekfac", "factors_fp16"]
    assert set(covariance["metrics"]) == {"factors_ekfac", "factors_fp16"}
    assert covariance["findings"] and all(f["subject"].startswith("factors_fp16:") for f in covariance["findings"])
    paired = {source["folder"]: source.get("paired_factors") for source in document["sources"]}
    assert paired["scores_ekfac_self"] == "factors_ekfac"  # the fp16 factors have other arguments
    assert inspect_path(copy, factors=["ekfac"])["status"] == "healthy"


# --- partitioned output --------------------------------------------------------------------------------


def _assert_all_close(merged: dict, reference: dict, exact: bool, **tolerance) -> None:
    assert merged.keys() == reference.keys()
    for key, value in reference.items():
        if isinstance(value, dict):
            _assert_all_close(merged[key], value, exact, **tolerance)
        elif exact:
            assert torch.equal(merged[key], value), key
        else:
            torch.testing.assert_close(merged[key], value, **tolerance)


def test_unaggregated_partitions_merge_like_kronfluence(unaggregated, partitioned, healthy):
    factors, pairwise, self_scores = read_path(unaggregated)
    assert all("_partition" in name for name in factors.files if "eigen" not in name)  # no aggregated file
    assert factors.partitions["covariance"]["complete"] and len(factors.partitions["covariance"]["merged"]) == 4
    kronfluence_aggregated = {source.folder: source for source in read_path(partitioned)}
    unpartitioned = {source.folder: source for source in read_path(healthy)}
    for merged in (factors, pairwise, self_scores):
        # Bit for bit what kronfluence's own aggregation wrote, and equal to the unpartitioned run.
        _assert_all_close(merged.artifacts, kronfluence_aggregated[merged.folder].artifacts, exact=True)
        _assert_all_close(merged.artifacts, unpartitioned[merged.folder].artifacts, exact=False, rtol=1e-4, atol=1e-4)
    counts = factors.artifacts["covariance"]["num_activation_covariance_processed"]
    assert {module: int(count.item()) for module, count in counts.items()} == {"0": 64, "2": 64}
    assert pairwise.artifacts["pairwise_scores"]["all_modules"].shape == (4, 64)


def test_unaggregated_partitions_through_the_command(capsys, unaggregated):
    code, out, _ = _inspect_cli(capsys, str(unaggregated), "--format", "json")
    stages = _stages(json.loads(out))
    assert code == 0
    assert all(stages[name]["status"] == "ok" for name in STAGES[1:])
    partitions = stages["lambda"]["metrics"]["factors_ekfac"]["partitions"]
    assert partitions["complete"] and partitions["data_partitions"] == partitions["module_partitions"] == 2


def test_missing_partitions_merge_what_is_there(unaggregated):
    for path in (unaggregated / "factors_ekfac").glob("*_data_partition1_module_partition1.safetensors"):
        path.unlink()
    (factors, *_) = read_path(unaggregated)
    counts = factors.artifacts["covariance"]["num_gradient_covariance_processed"]
    assert sorted(int(count.item()) for count in counts.values()) == [32, 64]  # module partition 1: half the data
    stage = _stages(inspect_path(unaggregated))["covariance"]
    assert stage["status"] == "ok"
    assert [f["check"] for f in stage["findings"]] == ["covariance.partitions"]


# --- bad input -----------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_module(path: Path) -> None:
    tensors = load_file(path)
    tensors.pop("2")
    save_file(tensors, path)


def _not_square(path: Path) -> None:
    tensors = load_file(path)
    tensors["0"] = tensors["0"][:, :3].contiguous()
    save_file(tensors, path)


def _short_eigenvalues(path: Path) -> None:
    tensors = load_file(path)
    tensors["0"] = tensors["0"][:-1].contiguous()
    save_file(tensors, path)


CORRUPTIONS = {
    "truncated": ("factors_ekfac/activation_covariance.safetensors", _truncate),
    "garbage": ("scores_ekfac_pairwise/pairwise_scores.safetensors", lambda p: p.write_bytes(b"not a tensor")),
    "missing count file": ("factors_ekfac/num_activation_covariance_processed.safetensors", Path.unlink),
    "count missing a module": ("factors_ekfac/num_gradient_covariance_processed.safetensors", _drop_module),
    "covariance not square": ("factors_ekfac/gradient_covariance.safetensors", _not_square),
    "eigenvalues disagree": ("factors_ekfac/activation_eigenvalues.safetensors", _short_eigenvalues),
    "bad json": ("scores_ekfac_self/score_arguments.json", lambda p: p.write_text("{not json")),
    "missing json": ("factors_ekfac/factor_arguments.json", Path.unlink),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_files_are_one_sentence_naming_the_file(capsys, tmp_path, healthy, case):
    copy = shutil.copytree(healthy, tmp_path / "small")
    relative, corrupt = CORRUPTIONS[case]
    corrupt(copy / relative)
    code, out, err = _inspect_cli(capsys, str(copy))
    assert (code, out) == (2, "")
    assert err.startswith("influence-doctor: error: ") and err.count("\n") == 1, err
    assert Path(relative).name in err


def test_not_kronfluence_output_and_missing_paths(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    for path in (tmp_path, tmp_path / "nowhere", tmp_path / "notes.txt"):
        code, out, err = _inspect_cli(capsys, str(path))
        assert (code, out) == (2, "")
        assert err.startswith("influence-doctor: error: ") and err.count("\n") == 1, err
        assert str(path) in err
    with pytest.raises(UsageError, match="not kronfluence output"):
        read_path(tmp_path)


def test_corrupt_file_through_the_real_command(cli, tmp_path, healthy):
    copy = shutil.copytree(healthy, tmp_path / "small")
    _truncate(copy / "factors_ekfac" / "lambda_matrix.safetensors")
    done = cli("inspect", str(copy))
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("influence-doctor: error: ") and "lambda_matrix.safetensors" in line
    assert "Traceback" not in done.stderr


# --- read-only ------------------------------------------------------------------------------------------


def test_inspect_writes_nothing_under_path(capsys, tmp_path, unaggregated):
    before = _snapshot(unaggregated)
    assert _inspect_cli(capsys, str(unaggregated))[0] == 0
    assert _snapshot(unaggregated) == before
    out_dir = tmp_path / "out"
    code, out, _ = _inspect_cli(capsys, str(unaggregated), "--out", str(out_dir))
    assert code == 0 and f"Report: {out_dir / 'inspect.json'}" in out
    assert _snapshot(unaggregated) == before
    document = json.loads((out_dir / "inspect.json").read_text())
    assert document["status"] == "healthy" and document["path"] == str(unaggregated)
    assert [path.name for path in out_dir.iterdir()] == ["inspect.json"]  # no temporary left behind


def test_out_inside_path_is_refused(capsys, healthy):
    before = _snapshot(healthy)
    code, _, err = _inspect_cli(capsys, str(healthy), "--out", str(healthy / "report"))
    assert code == 2 and "--out" in err
    assert _snapshot(healthy) == before
