"""What the two independent-reference audits cost on healthy runs (SPEC: together ≤ 10 % of the diagnosis).

The audits are the hooks-against-autograd audit (report.json's `fidelity.hooks`) and the refit with a
second sampling seed (`fidelity.seed`; a skipped refit costs 0 s). Each pipeline is diagnosed with the
defaults (`diagnose(pipeline, out_dir=..., progress=False)`), the whole call timed; each audit's own seconds
are those its report records. The share is (hooks + seed) / total. The target is printed beside the
measured share, not asserted: CPU timings on a shared machine are noisy.

Everything runs in this one process. Unless --cold, a warm-up diagnosis of `tests.pipelines:small` pays the
process's one-off costs first (the first calls into torch and kronfluence), so that they do not swell the
first pipeline's total; repeats are interleaved across the pipelines, and the median of --repeat is kept.

    .venv/bin/python benchmarks/audits.py [--pipelines uci-mlp,conv] [--repeat 3] [--cold]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = {
    "uci-mlp": "uci-mlp",
    "conv": "conv",
    "true-fisher-classifier": "tests.modern_models:true_fisher_classifier",
    "empirical-fisher-classifier": "tests.modern_models:empirical_fisher_classifier",
    "small": "tests.pipelines:small",
}
"""Healthy pipelines: a name → a built-in demo (as `--demo` resolves it) or a TARGET."""
TARGET_SHARE = 0.10
"""SPEC: the hooks audit and the second seed together, at most this share of a healthy diagnosis."""


def load(spec: str) -> Any:
    """The Pipeline of a demo name or a TARGET, as the command line resolves either."""
    from influence_doctor.demos import load_demo
    from influence_doctor.targets import load_target

    return load_target(spec) if ":" in spec else load_demo(spec)


def audit_seconds(fidelity: dict[str, Any], audit: str) -> float:
    """An audit's recorded seconds; 0 where it did not run at all (no entry) or was skipped."""
    return float((fidelity.get(audit) or {}).get("seconds") or 0.0)


def seed_note(seed: dict[str, Any]) -> str:
    """Why the seed audit cost what it did: skipped, absent, or its options measured too (below the bar)."""
    if not seed:
        return "absent"
    if seed.get("skipped"):
        return f"skipped: {seed['skipped']}"
    if seed.get("options"):
        return f"below the bar (median {seed['median_spearman']:.2f}): its options measured on the probe too"
    return ""


def measure(spec: str) -> dict[str, Any]:
    """One default diagnosis of `spec`: its status, the call's seconds and each audit's."""
    from influence_doctor import diagnose

    pipeline = load(spec)
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        report = diagnose(pipeline, out_dir=out, progress=False)
        total = time.perf_counter() - started
    fidelity = report.document["fidelity"]
    seed = fidelity.get("seed") or {}
    return {
        "status": report.status,
        "total": total,
        "hooks": audit_seconds(fidelity, "hooks"),
        "seed": audit_seconds(fidelity, "seed"),
        "seed_note": seed_note(seed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    subset = "comma-separated subset of " + ", ".join(PIPELINES)
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help=subset)
    parser.add_argument("--repeat", type=int, default=1, help="diagnoses per pipeline; the median is kept")
    parser.add_argument("--cold", action="store_true", help="no warm-up: the first pipeline pays the process's start")
    args = parser.parse_args()
    names = args.pipelines.split(",")
    unknown = [name for name in names if name not in PIPELINES]
    if unknown:
        parser.error(f"unknown pipeline(s) {', '.join(unknown)}; choose from {', '.join(PIPELINES)}")
    sys.path.insert(0, str(ROOT))  # the TARGETs under tests/
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if not args.cold:
        measure(PIPELINES["small"])
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for _ in range(args.repeat):  # interleaved, so that a machine slowing down over minutes hits every pipeline
        for name in names:
            runs[name].append(measure(PIPELINES[name]))
    rows, sums = [], {"total": 0.0, "hooks": 0.0, "seed": 0.0}
    for name, results in runs.items():
        median = {key: statistics.median(r[key] for r in results) for key in sums}
        for key in sums:
            sums[key] += median[key]
        statuses = sorted({r["status"] for r in results})
        notes = sorted({r["seed_note"] for r in results if r["seed_note"]})
        share = (median["hooks"] + median["seed"]) / median["total"]
        measured = [median["total"], median["hooks"], median["seed"], f"{share:.1%}"]
        rows.append([name, "/".join(statuses), *measured, "; ".join(notes)])
    share = (sums["hooks"] + sums["seed"]) / sums["total"]
    rows.append(["all", "", sums["total"], sums["hooks"], sums["seed"], f"{share:.1%}", ""])
    warm = "after a warm-up diagnosis" if not args.cold else "cold: the first pipeline pays the process's start"
    print(f"audit cost on healthy runs: median of {args.repeat}, CPU, {warm}; timings are noisy on a shared machine")
    headers = ["pipeline", "status", "total s", "hooks s", "seed s", "audits / total", "seed audit"]
    print(tabulate(rows, headers=headers, floatfmt=".2f"))
    print(f"target (SPEC): hooks + seed ≤ {TARGET_SHARE:.0%} of the diagnosis; measured over all: {share:.1%}")


if __name__ == "__main__":
    main()
