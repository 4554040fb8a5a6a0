"""Under torchrun (2 CPU processes over gloo, for real): one diagnosis, one report, one exit code.

kronfluence shards work only on CUDA; on the CPU each rank runs it whole, so these tests check what
the doctor adds: ranks merged into one report written by rank 0, decisions taken once, the same exit
code everywhere, and a sick pipeline diagnosed as it is in a single process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from fixtures import load_fixture
from influence_doctor import distributed
from influence_doctor.examine import StageRecord
from influence_doctor.findings import Finding
from tests.conftest import ROOT

TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")


def _torchrun(args: list[str], tmp_path: Path, module: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env["TMPDIR"] = str(tmp_path / "tmp")  # the ranks' private kronfluence folders must be gone afterwards
    env["INFLUENCE_RANK_CODES"] = str(tmp_path / "codes")
    (tmp_path / "tmp").mkdir(exist_ok=True)
    (tmp_path / "codes").mkdir(exist_ok=True)
    entry = ["-m", "influence_doctor"] if module else [str(ROOT / "tests" / "distributed" / "cli_entry.py")]
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *entry, *args]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)


def _codes(tmp_path: Path) -> dict[str, int]:
    return {file.name: int(file.read_text()) for file in sorted((tmp_path / "codes").iterdir())}


def test_healthy_pipeline_under_torchrun_gives_one_report_written_by_rank_0(tmp_path):
    out = tmp_path / "reports"
    args = ["diagnose", "tests.pipelines:small", "--out", str(out), "--format", "json", "--quiet"]
    result = _torchrun(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(result.stdout)  # exactly one JSON document on stdout, not one per rank
    assert document["status"] == "healthy"
    environment = document["environment"]
    assert (environment["world_size"], environment["rank"], environment["backend"]) == (2, 0, "gloo")
    assert environment["distributed"] == {
        "kronfluence_distributes": False,
        "ranks_agree": True,
        "stages_where_ranks_disagree": [],
    }
    for stage in document["stages"]:
        if stage["status"] != "skipped":
            assert stage["metrics"]["ranks"]["agree"] is True, stage["name"]
    runs = list((out / "small").iterdir())
    assert len(runs) == 1 and (runs[0] / "report.json").is_file()
    leftovers = [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("influence-doctor-rank")]
    assert leftovers == []  # rank 1's kronfluence folder was removed


@pytest.mark.parametrize("fix", [True, False], ids=["healed", "no-fix"])
def test_sick_pipeline_under_torchrun_gets_the_single_process_diagnosis_and_one_exit_code(tmp_path, fix):
    name = "fp16_covariance_overflow"
    _, expected = load_fixture(name)
    out = tmp_path / "reports"
    args = ["diagnose", f"fixtures.{name}:{name}", "--out", str(out), "--format", "json", "--quiet"]
    result = _torchrun([*args] if fix else [*args, "--no-fix"], tmp_path, module=False)
    codes = _codes(tmp_path)
    assert set(codes) == {"rank0", "rank1"}, result.stderr[-3000:]
    assert len(set(codes.values())) == 1  # every rank leaves with the same code
    assert result.returncode == codes["rank0"] == (0 if fix else 1), result.stderr[-3000:]
    document = json.loads(result.stdout)
    first = document["pipeline"]["diagnosis"][0]
    assert (first["cause"], first["stage"]) == (expected["cause"], expected["stage"])  # as in one process
    if fix:
        assert document["status"] == "healed"
        assert [r["rung"] for r in document["remedies"] if r["outcome"] in ("healed", "resolved")] == [expected["rung"]]
    else:
        assert document["status"] == "sick" and document["remedies"] == []
    assert len(list((out / "fp16-covariance-overflow").iterdir())) == 1


def _merge_on_rank(rank: int, store: str, results: str) -> None:
    """One rank of the merge test: rank 1 alone sees a NaN and measures a different number."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    record = StageRecord("covariance", status="ok")
    record.metrics["checks"] = {"0/activation_covariance": {"max_abs": 2.0 if rank == 0 else 2.5}}
    record.findings.append(Finding("covariance.headroom", "covariance", "0/a", "info", 0.1, 0.5, None, "ok"))
    if rank == 1:
        record.findings.append(Finding("covariance.finite", "covariance", "0/a", "fail", 3.0, 0.0, None, "NaN"))
    distributed.merge_stage(record)
    plan = distributed.decide({"examples": 256 + rank})
    Path(results, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "findings": [(f.check, f.subject, f.severity) for f in record.findings],
                "ranks": record.metrics["ranks"],
                "plan": plan,
                "code": distributed.agree_exit_code(rank),
            }
        )
    )
    dist.destroy_process_group()


def test_merge_keeps_what_one_rank_alone_saw_and_flags_ranks_that_disagree(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(_merge_on_rank, args=(str(tmp_path / "store"), str(results)), nprocs=2, join=True)
    merged = [json.loads((results / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert merged[0] == merged[1]  # every rank holds the same merged view
    view = merged[0]
    assert ["covariance.finite", "rank 1: 0/a", "fail"] in view["findings"]
    assert ["covariance.ranks_agree", "", "warn"] in view["findings"]
    assert view["ranks"]["differing_ranks"] == [1]
    assert view["ranks"]["largest_relative_difference"] == pytest.approx(0.5 / 2.5)
    assert view["plan"] == {"examples": 256}  # rank 0 decides
    assert view["code"] == 1  # the worst exit code wins


def test_without_a_process_group_everything_is_the_single_process_identity():
    record = StageRecord("lambda", status="ok")
    distributed.merge_stage(record)
    assert "ranks" not in record.metrics
    assert distributed.decide(3) == 3 and distributed.gather("x") == ["x"] and distributed.agree_exit_code(1) == 1
    assert distributed.current() == distributed.World()
