"""The `influence-doctor` command line: a thin shell over the library.

Exit codes: 0 healthy or healed, 1 sick, 2 bad usage or bad input (one sentence, no traceback),
130 interrupted (a partial report is still written).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from influence_doctor.errors import UsageError
from influence_doctor.options import help_of
from influence_doctor.report.strict_json import dumps
from influence_doctor.version import __version__

EXIT_OK, EXIT_SICK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one sentence and exit 2 (argparse's default code, kept)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message[:1].upper()}{message[1:]} (see 'influence-doctor {self.prog.split()[-1]} --help').")


UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _bytes(text: str) -> int:
    """A size like 800M, 12G or 1.5G (powers of 1024), or plain bytes."""
    number, unit = text.strip().upper().rstrip("IB").rstrip("B"), ""
    if number and number[-1] in UNITS:
        number, unit = number[:-1], number[-1]
    try:
        value = float(number) * UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 800M or 12G") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive size")
    return int(value)


def _examples(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="influence-doctor",
        description="Run kronfluence influence pipelines instrumented, find what breaks them, and say why.",
    )
    parser.add_argument("--version", action="version", version=f"influence-doctor {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    diagnose = commands.add_parser(
        "diagnose",
        help="rehearse a pipeline on a subsample, check every stage and write a report",
        description="Run TARGET (or a built-in demo) through covariance, eigendecomposition, lambda and "
        "scores with every stage checked, and write reports/<pipeline>/<run-id>/report.json.",
    )
    diagnose.add_argument(
        "target",
        nargs="?",
        metavar="TARGET",
        help="'package.module:attr' or 'path/to/file.py:attr' naming a Pipeline or a function returning one; "
        "omitted: the built-in demo (tiny-lm unless --demo says otherwise)",
    )
    diagnose.add_argument("--demo", metavar="NAME", help="built-in demo to run: tiny-lm (default), uci-mlp, conv")
    diagnose.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help=f"{help_of('out_dir')} (default: reports_dir from config, else reports)",
    )
    diagnose.add_argument("--no-fix", action="store_true", help=f"diagnose only; do not {help_of('fix')}")
    diagnose.add_argument("--full", action="store_true", help="analyse every training example (no rehearsal)")
    diagnose.add_argument(
        "--examples", type=_examples, default="auto", metavar="N|auto", help=f"{help_of('examples')} (default: auto)"
    )
    diagnose.add_argument(
        "--queries", type=_positive_int, default=16, metavar="N", help=f"{help_of('queries')} (default: 16)"
    )
    diagnose.add_argument(
        "--probe-examples", type=int, default=64, metavar="N", help=f"{help_of('probe_examples')} (default: 64)"
    )
    diagnose.add_argument("--memory-budget", type=_bytes, default=None, metavar="SIZE", help=help_of("memory_budget"))
    diagnose.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help=f"{help_of('device')} (default: auto)"
    )
    diagnose.add_argument("--seed", type=int, default=None, help=help_of("seed"))
    diagnose.add_argument(
        "--format",
        choices=("text", "json", "md"),
        default="text",
        help="what goes to stdout; json prints exactly the report.json document",
    )
    diagnose.add_argument("--quiet", action="store_true", help=f"no {help_of('progress')}")
    diagnose.set_defaults(handler=_diagnose)

    inspect = commands.add_parser(
        "inspect",
        help="check the factors and scores kronfluence already wrote, without the model",
        description="Read a kronfluence analysis folder (<output_dir>/<analysis_name>, holding factors_*/ and "
        "scores_*/), or one factors_NAME/ or scores_NAME/ folder, partitioned files included, and check what "
        "it holds. Reads only: nothing is written unless --out is given. Every factors and scores folder "
        "found is read; --factors and --scores narrow that down.",
    )
    inspect.add_argument("path", metavar="PATH", help="analysis, factors or scores folder written by kronfluence")
    inspect.add_argument(
        "--factors",
        action="append",
        metavar="NAME",
        help="read only factors_NAME/ of the analysis folder (repeatable); when --factors or --scores is "
        "given, only the named folders are read",
    )
    inspect.add_argument(
        "--scores", action="append", metavar="NAME", help="read only scores_NAME/ of the analysis folder (repeatable)"
    )
    inspect.add_argument(
        "--out", metavar="DIR", default=None, help="also write DIR/inspect.json (DIR outside PATH); default: none"
    )
    inspect.add_argument(
        "--format",
        choices=("text", "json", "md"),
        default="text",
        help="what goes to stdout; json prints the inspect.json document",
    )
    inspect.set_defaults(handler=_inspect)

    compare = commands.add_parser(
        "compare",
        help="hold a report to the configured gates and to a baseline report",
        description="Evaluate the gates of [tool.influence-doctor.gates] on CURRENT against BASELINE "
        "(report.json files or the folders holding them) and list what differs between the two, timings "
        "aside; exit 0 when every gate passes, 1 otherwise.",
    )
    compare.add_argument(
        "baseline",
        metavar="BASELINE",
        help="baseline report.json, its run folder, an --out folder or a baselines folder",
    )
    compare.add_argument("current", metavar="CURRENT", help="current report.json, its run folder or an --out folder")
    compare.add_argument("--format", choices=("text", "json"), default="text", help="what goes to stdout")
    compare.set_defaults(handler=_compare)

    schema = commands.add_parser(
        "schema",
        help="print the JSON Schema of report.json",
        description="Print the JSON Schema (draft 2020-12) that every report.json follows.",
    )
    schema.set_defaults(handler=_schema)
    return parser


def _diagnose(args: argparse.Namespace) -> int:
    from influence_doctor.config import load_config
    from influence_doctor.demos import DEFAULT_DEMO, load_demo
    from influence_doctor.targets import load_target

    config = load_config()

    if args.target and args.demo:
        raise UsageError("Give either a TARGET or --demo, not both.")
    pipeline = load_target(args.target) if args.target else load_demo(args.demo or DEFAULT_DEMO)
    target = args.target or f"demo:{args.demo or DEFAULT_DEMO}"

    from influence_doctor import distributed
    from influence_doctor.doctor import diagnose
    from influence_doctor.environment import process_age
    from influence_doctor.report.text import render

    world = distributed.init_from_environment(args.device)  # under torchrun: join the ranks
    report = diagnose(
        pipeline,
        fix=not args.no_fix,
        out_dir=args.out or config.reports_dir,
        examples=None if args.full else args.examples,
        queries=args.queries,
        device=args.device,
        seed=args.seed,
        progress=not args.quiet,
        target=target,
        probe_examples=max(args.probe_examples, 0),
        thresholds=config.make_thresholds(),
        ladders=config.ladders,
        min_fix_spearman=config.gates.min_fix_spearman,
        memory_budget=args.memory_budget,
        prior_seconds=process_age(),
    )
    if world.is_writer:  # under torchrun one report on stdout, rank 0's
        if args.format == "json":
            sys.stdout.write(dumps(report.document))
        else:
            sys.stdout.write(render(report.document, markdown=args.format == "md"))
            sys.stdout.write(f"\nReport: {report.json_path}\n")
    code = EXIT_OK if report.status in ("healthy", "healed") else EXIT_SICK
    if world.distributed:
        code = distributed.agree_exit_code(code)  # every rank leaves with the same code
        distributed.finish()
    return code


def _compare(args: argparse.Namespace) -> int:
    """Exit 1 when any gate fails: the current run may not replace the baseline. Differences alone
    (a new warning, another remedy) are printed for a person to judge; the gates decide the exit code.
    Given folders (an --out folder, a baselines folder), reports are paired by pipeline, the latest run
    of each, and every pair is held to the gates."""
    from influence_doctor.config import load_config
    from influence_doctor.gates import collect_reports, single_report

    gates = load_config().gates
    if single_report(args.baseline) and single_report(args.current):
        passed, document, text = _compare_pair(Path(args.baseline), Path(args.current), gates)
        if args.format == "json":
            sys.stdout.write(dumps(document))
        else:
            sys.stdout.write(text + f"\n{'PASS' if passed else 'FAIL'}: {args.current} against {args.baseline}\n")
        return EXIT_OK if passed else EXIT_SICK
    baselines = {"(the one report)": Path(args.baseline)} if single_report(args.baseline) else None
    currents = {"(the one report)": Path(args.current)} if single_report(args.current) else None
    baselines = baselines or collect_reports(args.baseline)
    currents = currents or collect_reports(args.current)
    if len(baselines) == 1 and len(currents) == 1:  # one report against a folder of one pipeline
        baselines = {next(iter(currents)): next(iter(baselines.values()))}
    paired = sorted(set(baselines) & set(currents))
    if not paired:
        raise UsageError(
            f"no pipeline has a report on both sides: {', '.join(sorted(baselines))} against "
            f"{', '.join(sorted(currents))}."
        )
    results, texts = [], []
    for name in paired:
        passed, document, text = _compare_pair(baselines[name], currents[name], gates)
        results.append({"pipeline": name, "baseline": str(baselines[name]), "current": str(currents[name]), **document})
        texts.append(f"== {name}: {currents[name]} against {baselines[name]}\n{text}")
    unpaired = {
        "baseline_only": sorted(set(baselines) - set(currents)),
        "current_only": sorted(set(currents) - set(baselines)),
    }
    passed = all(result["passed"] for result in results)
    if args.format == "json":
        sys.stdout.write(dumps({"passed": passed, "pairs": results, "unpaired": unpaired}))
    else:
        sys.stdout.write("\n".join(texts))
        for side, names in unpaired.items():
            if names:
                sys.stdout.write(f"\nnot paired ({side.replace('_', ' ')}): {', '.join(names)}\n")
        verdicts = ", ".join(f"{r['pipeline']} {'pass' if r['passed'] else 'FAIL'}" for r in results)
        sys.stdout.write(f"\n{'PASS' if passed else 'FAIL'}: {len(results)} pipeline(s) paired ({verdicts})\n")
    return EXIT_OK if passed else EXIT_SICK


def _compare_pair(baseline_path: Path, current_path: Path, gates: Any) -> tuple[bool, dict[str, Any], str]:
    """One report against its baseline: whether every gate passed, the JSON document, the text."""
    from influence_doctor.gates import evaluate, load_report, render_gates, score_rank_agreement
    from influence_doctor.report.diff import differences, render_differences

    baseline, baseline_dir = load_report(baseline_path)
    current, current_dir = load_report(current_path)
    results = evaluate(current, gates, baseline, current_dir, baseline_dir)
    found = differences(baseline, current)
    if any(entry["section"] == "scores" and entry["path"].endswith(".digest") for entry in found):
        for kind, value in score_rank_agreement(current_dir, baseline_dir).items():
            found.append(
                {
                    "section": "scores",
                    "change": "rank agreement",
                    "path": f"scores.{kind}",
                    "baseline": None,
                    "current": value,
                    "text": f"scores.{kind}: Spearman {value:.4f} between the two runs' scores",
                }
            )
    passed = all(r.passed for r in results)
    document = {
        "passed": passed,
        "identical_apart_from_timings": not found,
        "differences": found,
        "gates": [r.to_dict() for r in results],
    }
    return passed, document, render_gates(results) + "\n\n" + render_differences(found) + "\n"


def _schema(args: argparse.Namespace) -> int:
    from influence_doctor.report.schema import schema_text

    sys.stdout.write(schema_text())
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    """Exit 1 when any stage fails its checks: what kronfluence wrote is not fit to use."""
    from influence_doctor.config import load_config
    from influence_doctor.inspect import check_out_dir, inspect_path, render, write_document

    thresholds = load_config().make_thresholds()
    if args.out:
        check_out_dir(args.out, args.path)
    document = inspect_path(args.path, factors=args.factors, scores=args.scores, thresholds=thresholds)
    written = write_document(document, args.out, args.path) if args.out else None
    if args.format == "json":
        sys.stdout.write(dumps(document))
    else:
        sys.stdout.write(render(document, markdown=args.format == "md"))
        if written is not None:
            sys.stdout.write(f"\nReport: {written}\n")
    return EXIT_OK if document["status"] == "healthy" else EXIT_SICK


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except UsageError as exc:
        print(f"influence-doctor: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("influence-doctor: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
