"""Healthy-path cost of the doctor against the same kronfluence calls alone (SPEC section 11).

The bare side makes exactly the calls the doctor makes, with the same arguments: `prepare_model`, the
`Analyzer`, then `fit_covariance_matrices`, `perform_eigendecomposition`, `fit_lambda_matrices`,
`compute_pairwise_scores` and `compute_self_scores` on the same subsets, seeded per stage as the doctor
seeds them. Training is the user's own loop on both sides and is taken off both totals. Everything
else the doctor does — checks, coverage, loading factors back, reports, plots — is overhead.

Each configuration runs in its own process and diagnoses the pipeline twice: the first ("cold") pays
the one-off costs of a process (first calls into torch and kronfluence, the doctor's imports), the
second ("warm") what every further pipeline of a CI suite pays. The repeats are interleaved across
the configurations, and the best of --repeat is kept.

    .venv/bin/python benchmarks/overhead.py --demo uci-mlp --repeat 3
    PROJECTION_EXAMPLES=4096 .venv/bin/python benchmarks/overhead.py --target benchmarks/projection.py:wide_mlp
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "bare": "kronfluence alone (the doctor's calls)",
    "checks": "doctor, checks on (healthy path)",
    "probes": "doctor, checks + probes",
}


def _pipeline(spec: str):
    from influence_doctor.demos import load_demo
    from influence_doctor.targets import load_target

    return load_target(spec) if ":" in spec else load_demo(spec)


def bare(spec: str, out: str) -> float:
    """The doctor's kronfluence calls alone, training excluded."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from torch.utils.data import Subset

    from influence_doctor.environment import seed_everything
    from influence_doctor.pipeline import STAGES, TrainingMonitor, resolve

    pipeline = _pipeline(spec)
    seed_everything(pipeline.seed)
    model, train, queries = (resolve(x) for x in (pipeline.model, pipeline.train_dataset, pipeline.query_dataset))
    if pipeline.train is not None:
        pipeline.train(model, train, TrainingMonitor())
    gc.freeze()  # the doctor does this too: kronfluence's gc.collect() calls are then cheap for both
    started = time.perf_counter()
    train, queries = Subset(train, list(range(len(train)))), Subset(queries, list(range(len(queries))))
    model = prepare_model(model, pipeline.task)
    analyzer = Analyzer(
        "bench", model, pipeline.task, cpu=True, disable_tqdm=True, log_level=logging.WARNING, output_dir=out
    )
    batch, factor_args, score_args = pipeline.batch_size, pipeline.factor_args, pipeline.score_args
    seed_everything(pipeline.seed + STAGES.index("covariance"))
    analyzer.fit_covariance_matrices(
        "f", train, per_device_batch_size=batch, factor_args=factor_args, overwrite_output_dir=True
    )
    seed_everything(pipeline.seed + STAGES.index("eigendecomposition"))
    analyzer.perform_eigendecomposition("f", factor_args=factor_args, overwrite_output_dir=True)
    seed_everything(pipeline.seed + STAGES.index("lambda"))
    analyzer.fit_lambda_matrices(
        "f", train, per_device_batch_size=batch, factor_args=factor_args, overwrite_output_dir=True
    )
    if "pairwise" in pipeline.scores:
        seed_everything(pipeline.seed + STAGES.index("pairwise_scores"))
        analyzer.compute_pairwise_scores(
            "p",
            "f",
            queries,
            train,
            per_device_query_batch_size=pipeline.query_batch_size,
            per_device_train_batch_size=batch,
            score_args=score_args,
            overwrite_output_dir=True,
        )
    if "self" in pipeline.scores:
        seed_everything(pipeline.seed + STAGES.index("self_scores"))
        analyzer.compute_self_scores(
            "s", "f", train, per_device_train_batch_size=batch, score_args=score_args, overwrite_output_dir=True
        )
    seconds = time.perf_counter() - started
    gc.unfreeze()
    return seconds


def doctored(spec: str, out: str, probes: int) -> float:
    """diagnose() without remedies, on every example and query; the user's training loop taken off."""
    from influence_doctor import diagnose

    started = time.perf_counter()
    report = diagnose(
        _pipeline(spec),
        fix=False,
        out_dir=out,
        examples=None,
        queries=None,
        progress=False,
        probe_examples=probes,
        device="cpu",
    )
    training = report.document["stages"][0]["metrics"].get("training_seconds") or 0.0
    return time.perf_counter() - started - training


def child(mode: str, spec: str) -> None:
    warnings.filterwarnings("ignore")
    import kronfluence.analyzer  # noqa: F401  (both sides have torch and kronfluence imported)

    seconds = []
    for _ in range(2):  # cold, then warm
        with tempfile.TemporaryDirectory() as out:
            seconds.append(bare(spec, out) if mode == "bare" else doctored(spec, out, 64 if mode == "probes" else 0))
        gc.collect()  # what the first run left in reference cycles is freed before the second, on both sides
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"cold": seconds[0], "warm": seconds[1], "maxrss_mb": peak}))


def measure(mode: str, spec: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--pipeline", spec],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="Doctor overhead vs the same kronfluence calls alone.")
    parser.add_argument("--demo", default="uci-mlp", choices=("tiny-lm", "uci-mlp", "conv"))
    parser.add_argument("--target", help="a TARGET instead of a demo, e.g. benchmarks/projection.py:wide_mlp")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    parser.add_argument("--child", choices=tuple(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        child(args.child, args.pipeline)
        return
    spec = args.target or args.demo
    modes = args.modes.split(",")
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for _ in range(args.repeat):  # interleaved, so that a machine slowing down over minutes hits every mode alike
        for mode in modes:
            runs[mode].append(measure(mode, spec))
    results = {mode: {key: min(r[key] for r in runs[mode]) for key in ("cold", "warm", "maxrss_mb")} for mode in modes}
    base = results["bare"]
    print(f"{spec}: best of {args.repeat}, training excluded, CPU")
    print(f"{'configuration':<40}{'cold s':>8}{'ratio':>7}{'warm s':>8}{'ratio':>7}{'peak MB':>9}{'ratio':>7}")
    for mode, result in results.items():
        print(
            f"{MODES[mode]:<40}{result['cold']:>8.3f}{result['cold'] / base['cold']:>7.2f}"
            f"{result['warm']:>8.3f}{result['warm'] / base['warm']:>7.2f}"
            f"{result['maxrss_mb']:>9.0f}{result['maxrss_mb'] / base['maxrss_mb']:>7.2f}"
        )


if __name__ == "__main__":
    main()
