"""Healthy-path overhead of the doctor against the same kronfluence calls alone (SPEC section 11).

Each configuration runs in its own subprocess (fresh imports, its own peak RSS); the best of --repeat
is kept. Training is excluded from every timing. Prints ratios against bare kronfluence:

    .venv/bin/python benchmarks/overhead.py --demo uci-mlp --repeat 3
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
import warnings

MODES = {
    "bare": "kronfluence alone",
    "checks": "doctor, checks on (healthy path)",
    "probes": "doctor, checks + probes",
}


def bare(demo: str, out: str) -> float:
    """prepare_model, Analyzer, fit_all_factors, pairwise and self scores: what a user would run."""
    from kronfluence.analyzer import Analyzer, prepare_model

    from influence_doctor.demos import load_demo
    from influence_doctor.environment import seed_everything
    from influence_doctor.pipeline import TrainingMonitor, resolve

    pipeline = load_demo(demo)
    seed_everything(pipeline.seed)
    model, train, queries = (resolve(x) for x in (pipeline.model, pipeline.train_dataset, pipeline.query_dataset))
    pipeline.train(model, train, TrainingMonitor())
    gc.freeze()  # the doctor does this too: kronfluence's gc.collect() calls are then cheap for both
    started = time.perf_counter()
    model = prepare_model(model, pipeline.task)
    analyzer = Analyzer(
        "bench", model, pipeline.task, cpu=True, disable_tqdm=True, log_level=logging.WARNING, output_dir=out
    )
    batch, fa, sa = pipeline.batch_size, pipeline.factor_args, pipeline.score_args
    analyzer.fit_all_factors("f", train, per_device_batch_size=batch, factor_args=fa, overwrite_output_dir=True)
    analyzer.compute_pairwise_scores(
        "p",
        "f",
        queries,
        train,
        per_device_query_batch_size=pipeline.query_batch_size,
        per_device_train_batch_size=batch,
        score_args=sa,
        overwrite_output_dir=True,
    )
    analyzer.compute_self_scores(
        "s", "f", train, per_device_train_batch_size=batch, score_args=sa, overwrite_output_dir=True
    )
    return time.perf_counter() - started


def doctored(demo: str, out: str, probes: int) -> float:
    """diagnose() without remedies; the train stage's own seconds are taken off the total.

    The modules the doctor imports lazily are imported first, as the bare run imports kronfluence first:
    one-off import time is not overhead of a long run."""
    import kronfluence.analyzer  # noqa: F401
    import scipy.stats  # noqa: F401

    import influence_doctor.inspect  # noqa: F401
    from influence_doctor import diagnose
    from influence_doctor.demos import load_demo

    started = time.perf_counter()
    report = diagnose(
        load_demo(demo),
        fix=False,
        out_dir=out,
        examples=None,
        queries=None,
        progress=False,
        probe_examples=probes,
        device="cpu",
    )
    return time.perf_counter() - started - report.document["stages"][0]["seconds"]


def child(mode: str, demo: str) -> None:
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as out:
        seconds = bare(demo, out) if mode == "bare" else doctored(demo, out, 64 if mode == "probes" else 0)
    print(json.dumps({"seconds": seconds, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(mode: str, demo: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--demo", demo], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="Doctor overhead vs bare kronfluence.")
    parser.add_argument("--demo", default="uci-mlp", choices=("tiny-lm", "uci-mlp", "conv"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", choices=tuple(MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.demo)
        return
    results = {}
    for mode in MODES:
        runs = [measure(mode, args.demo) for _ in range(args.repeat)]
        results[mode] = {key: min(r[key] for r in runs) for key in ("seconds", "maxrss_mb")}
    base = results["bare"]
    print(f"demo {args.demo}: best of {args.repeat}, training excluded, CPU")
    print(f"{'configuration':<34}{'seconds':>9}{'ratio':>8}{'peak MB':>10}{'ratio':>8}")
    for mode, result in results.items():
        print(
            f"{MODES[mode]:<34}{result['seconds']:>9.2f}{result['seconds'] / base['seconds']:>8.2f}"
            f"{result['maxrss_mb']:>10.0f}{result['maxrss_mb'] / base['maxrss_mb']:>8.2f}"
        )


if __name__ == "__main__":
    main()
