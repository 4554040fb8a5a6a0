"""The rehearsal's projections against a real full run (SPEC section 11, issue targets).

One healthy pipeline whose full run takes minutes on a CPU (an MLP 64→512×3→1 on 16,384 examples, 64
queries, kronfluence's heuristic damping, analysed as built: no training, so both runs time only
kronfluence's stages) is run twice, each in its
own process: once as `diagnose` rehearses it by default (time budget, probes on), once in full
(`--full`, probes and healing off). Printed per stage: projected vs measured peak memory (RSS on the
CPU, the CUDA allocator's peak on a GPU) and seconds, with ratios; then the rehearsal's wall time as a
share of the full run's. Targets: memory within 1.5×, time within 2×, rehearsal ≤ 10 %.

    .venv/bin/python benchmarks/projection.py [--examples 16384] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from kronfluence.arguments import FactorArguments, ScoreArguments
from torch import nn
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from influence_doctor.demos.uci_mlp import RegressionTask  # noqa: E402
from influence_doctor.pipeline import Pipeline  # noqa: E402

FEATURES, WIDTH = 64, 512
EXAMPLES = 16_384
QUERIES = 64


def _data(count: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, FEATURES, generator=generator)
    return TensorDataset(x, x[:, :4].sum(dim=1, keepdim=True))


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(FEATURES, WIDTH), nn.Tanh()]
    for _ in range(2):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 1))


def wide_mlp() -> Pipeline:
    examples = int(os.environ.get("PROJECTION_EXAMPLES", EXAMPLES))
    return Pipeline(
        name="projection-benchmark",
        model=_model,
        task=RegressionTask(),
        train_dataset=_data(examples, seed=0),
        query_dataset=_data(QUERIES, seed=1),
        factor_args=FactorArguments(strategy="ekfac"),
        score_args=ScoreArguments(damping_factor=None),  # kronfluence's heuristic: a healthy pipeline
        batch_size=64,
        query_batch_size=64,
    )


def _run(out: Path, examples: int, device: str, *flags: str) -> tuple[dict, float]:
    command = [
        sys.executable,
        "-m",
        "influence_doctor",
        "diagnose",
        f"{Path(__file__)}:wide_mlp",
        "--quiet",
        "--format",
        "json",
        "--queries",
        str(QUERIES),
        "--device",
        device,
        "--out",
        str(out),
        *flags,
    ]
    started = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PROJECTION_EXAMPLES": str(examples)}
    )
    wall = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout), wall


def main() -> None:
    from tabulate import tabulate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=EXAMPLES)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        rehearsal, rehearsal_wall = _run(Path(out), args.examples, args.device)
        full, full_wall = _run(Path(out), args.examples, args.device, "--full", "--no-fix", "--probe-examples", "0")
    projection = rehearsal["projection"]
    measured = {stage["name"]: stage for stage in full["stages"]}
    rows = []
    for name, projected in projection["stages"].items():
        stage = measured[name]
        peak = (stage["metrics"].get("memory") or {}).get("peak_bytes")
        rows.append(
            [
                name,
                _mib(projected.get("peak_bytes")),
                _mib(peak),
                _ratio(projected.get("peak_bytes"), peak),
                _s(projected.get("seconds")),
                _s(stage["seconds"]),
                _ratio(projected.get("seconds"), stage["seconds"]),
            ]
        )
    print(
        f"{full['pipeline']['rehearsal']['examples_total']} examples, {QUERIES} queries, {args.device}; "
        f"rehearsal of {rehearsal['pipeline']['rehearsal']['examples']} examples "
        f"({rehearsal['pipeline']['rehearsal']['plan']['chosen_by']})"
    )
    headers = ["stage", "projected MiB", "measured MiB", "ratio", "projected s", "measured s", "ratio"]
    print(tabulate(rows, headers=headers, tablefmt="simple"))
    train = lambda document: document["stages"][0]["seconds"] or 0.0  # noqa: E731
    stages_full = sum(s["seconds"] or 0.0 for s in full["stages"][1:])
    print(
        f"\nwall time: rehearsal {rehearsal_wall:.1f} s (everything: pilots, probes, checks, reports), "
        f"full run {full_wall:.1f} s → {rehearsal_wall / full_wall:.1%}"
        f"\nkronfluence stages: projected {projection['seconds']:.1f} s, measured {stages_full:.1f} s → "
        f"{_ratio(projection['seconds'], stages_full)}; training took {train(full):.1f} s in each"
    )


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value / 2**20:.0f}"


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _ratio(projected: float | None, measured: float | None) -> str:
    if not projected or not measured:
        return "—"
    return f"{projected / measured:.2f}"


if __name__ == "__main__":
    main()
