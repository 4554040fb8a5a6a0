"""pytest start-up with the plugin installed but not enabled, against the same run without it
(SPEC section 11: within 5 %). Times `pytest --collect-only` on a small scratch project.

    .venv/bin/python benchmarks/startup.py --repeat 10
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(args: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", *args], cwd=cwd, check=True, capture_output=True
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description="pytest start-up with and without the plugin.")
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        project = Path(folder)
        for index in range(20):
            (project / f"test_{index}.py").write_text("def test_one():\n    assert True\n")
        runs = {"without plugin": [], "with plugin (off)": []}
        for _ in range(args.repeat):  # interleaved, so drift hits both alike
            runs["without plugin"].append(timed(["-p", "no:influence-doctor"], project))
            runs["with plugin (off)"].append(timed([], project))
    base = statistics.median(runs["without plugin"])
    for label, values in runs.items():
        median = statistics.median(values)
        print(f"{label:<20} median {median * 1000:7.1f} ms   ratio {median / base:5.3f}")


if __name__ == "__main__":
    main()
