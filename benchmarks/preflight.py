"""What the pre-flight costs on GPT-2 small's real shape, where it must stop the run before anything is fitted.

`tests.modern_models:gpt2_small_shape` is GPT-2 small built from `GPT2Config()` (vocab 50,257, 12 layers,
`lm_head` tied to `transformer.wte`), random weights, never trained. Its `lm_head` has a 50,257² gradient
covariance: past the eigensolver's 32-bit limit whatever the memory, and past this machine's memory too.

Each budget runs in a fresh process, so that the imports and the peak resident set are the whole process's:
once with the default memory budget (the device's memory) and once with `memory_budget=1e11` (100 GB).
Printed per budget: the process's peak RSS (`ru_maxrss`), the seconds in imports (torch, transformers'
GPT-2, the doctor, the test models), the seconds in `diagnose`, of those the seconds spent building the
124M-parameter model from its config (the pipeline's own factory, timed apart: random initialisation, twice
over in transformers), and the rest, the doctor's own; the status and the checks of the findings above info.
The targets are printed beside the measured values, not asserted: CPU timings on a shared machine are noisy.

    .venv/bin/python benchmarks/preflight.py [--budgets default,1e11]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 20.0
"""The doctor's own time on GPT-2 small's shape, pre-flight stop included."""
TARGET_PEAK_BYTES = 3e9
"""The whole process's peak resident set."""


def child(budget: str) -> None:
    """One diagnosis in this process; prints one JSON line of what it measured."""
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    import torch  # noqa: F401
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401  (what building the model imports)

    from influence_doctor import diagnose
    from tests.modern_models import gpt2_small_shape

    imports = time.perf_counter() - started
    memory_budget = None if budget == "default" else float(budget)
    pipeline = gpt2_small_shape()
    build = pipeline.model
    built: list[float] = []

    def timed_build() -> Any:
        began = time.perf_counter()
        model = build()
        built.append(time.perf_counter() - began)
        return model

    pipeline = dataclasses.replace(pipeline, model=timed_build)
    with tempfile.TemporaryDirectory() as out:
        began = time.perf_counter()
        report = diagnose(pipeline, out_dir=out, progress=False, memory_budget=memory_budget)
        seconds = time.perf_counter() - began
    stages = {stage["name"]: stage for stage in report.document["stages"]}
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result: dict[str, Any] = {
        "imports": imports,
        "diagnose": seconds,
        "build": sum(built),
        "peak_bytes": peak_kib * 1024,
        "status": report.status,
        "findings": sorted({f"{f.check} ({f.severity})" for f in report.findings if f.severity != "info"}),
        "budget_bytes": (stages["train"]["metrics"].get("preflight") or {}).get("budget_bytes"),
    }
    print(json.dumps(result))


def measure(budget: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", budget], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="default,1e11", help="comma-separated: 'default' or bytes, e.g. 1e11")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        child(args.child)
        return
    rows, findings = [], []
    for budget in args.budgets.split(","):
        result = measure(budget)
        shown = f"{result['budget_bytes'] / 1e9:.3g} GB" if result["budget_bytes"] else "none"
        rows.append(
            [
                f"{budget} ({shown})",
                result["status"],
                f"{result['peak_bytes'] / 1e9:.2f}",
                f"{result['imports']:.2f}",
                f"{result['diagnose']:.2f}",
                f"{result['build']:.2f}",
                f"{result['diagnose'] - result['build']:.2f}",
            ]
        )
        findings.append(f"  {budget}: " + (", ".join(result["findings"]) or "none"))
    print("GPT-2 small's shape, one fresh process per budget, CPU; timings are noisy on a shared machine")
    headers = ["budget", "status", "peak RSS GB", "imports s", "diagnose s", "model build s", "doctor's own s"]
    print(tabulate(rows, headers=headers))
    print("findings above info:")
    print("\n".join(findings))
    print(
        f"targets: diagnose under {TARGET_SECONDS:.0f} s (the build included); peak RSS under "
        f"{TARGET_PEAK_BYTES / 1e9:.0f} GB; with 1e11 still not healthy (preflight.solver_limit)"
    )


if __name__ == "__main__":
    main()
