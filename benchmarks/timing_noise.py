"""How much stage seconds move between two runs of one pipeline on one machine, quiet and under load.

Runs the built-in demo several times as `influence-doctor diagnose` would (real CLI, separate processes),
first on a quiet machine, then with a concurrent CPU load on every core (busy-looping processes, what a
neighbour on a shared CI runner does), and prints, per stage, the spread of its seconds: the ratio and
the difference between the slowest and the fastest run. `min_seconds_difference` is set from the largest
difference measured under load; the last table holds every loaded run to the first quiet one with the
default gates, as CI would:

    .venv/bin/python benchmarks/timing_noise.py            # 3 quiet runs, 3 loaded runs
    .venv/bin/python benchmarks/timing_noise.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _spin(stop: multiprocessing.synchronize.Event) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def run_demo(out: Path) -> dict:
    """One diagnosis of the demo in its own process; its report."""
    subprocess.run(
        [sys.executable, "-m", "influence_doctor", "diagnose", "--out", str(out), "--quiet", "--format", "json"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    report = max(out.glob("*/*/report.json"), key=lambda path: path.stat().st_mtime)
    return json.loads(report.read_text())


def stage_seconds(document: dict) -> dict[str, float]:
    return {stage["name"]: stage["seconds"] for stage in document["stages"] if stage.get("seconds")}


def main() -> None:
    from tabulate import tabulate

    from influence_doctor.config import Gates
    from influence_doctor.gates import evaluate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per condition (default 3)")
    args = parser.parse_args()
    reports: dict[str, list[dict]] = {"quiet": [], "loaded": []}
    with tempfile.TemporaryDirectory() as folder:
        for condition in ("quiet", "loaded"):
            stop = multiprocessing.Event()
            spinners = []
            if condition == "loaded":
                spinners = [multiprocessing.Process(target=_spin, args=(stop,)) for _ in range(os.cpu_count() or 1)]
                for spinner in spinners:
                    spinner.start()
            try:
                for index in range(args.runs):
                    started = time.perf_counter()
                    reports[condition].append(run_demo(Path(folder) / f"{condition}-{index}"))
                    print(f"{condition} run {index + 1}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
            finally:
                stop.set()
                for spinner in spinners:
                    spinner.join()
    rows = []
    for condition, documents in reports.items():
        per_stage: dict[str, list[float]] = {}
        for document in documents:
            for stage, seconds in stage_seconds(document).items():
                per_stage.setdefault(stage, []).append(seconds)
        for stage, values in per_stage.items():
            rows.append(
                [
                    condition,
                    stage,
                    f"{min(values):.3g}",
                    f"{statistics.median(values):.3g}",
                    f"{max(values):.3g}",
                    f"{max(values) / min(values):.2f}",
                    f"{max(values) - min(values):.3g}",
                ]
            )
    headers = ["condition", "stage", "min s", "median s", "max s", "max/min", "max−min s"]
    print(f"Stage seconds of the demo, {args.runs} runs per condition, on {os.cpu_count()} cores:")
    print(tabulate(rows, headers=headers, tablefmt="simple"))
    quiet = reports["quiet"][0]
    loaded_vs_quiet = {
        stage: max(stage_seconds(d).get(stage, 0.0) for d in reports["loaded"]) - seconds
        for stage, seconds in stage_seconds(quiet).items()
    }
    print(
        f"\nLargest slowdown under load against the first quiet run: {max(loaded_vs_quiet.values()):.3g} s "
        f"({max(loaded_vs_quiet, key=loaded_vs_quiet.get)})"
    )
    print("\nEvery loaded run against the first quiet run, default gates:")
    gate_rows = []
    for index, document in enumerate(reports["loaded"]):
        results = {r.gate: r for r in evaluate(document, Gates(), quiet)}
        timing = results["max_seconds_ratio"]
        failed = [name for name, result in results.items() if not result.passed]
        gate_rows.append([index + 1, timing.value, timing.detail, ", ".join(failed) or "none"])
    print(tabulate(gate_rows, headers=["loaded run", "worst ratio", "timing gate", "failed gates"], tablefmt="simple"))


if __name__ == "__main__":
    main()
