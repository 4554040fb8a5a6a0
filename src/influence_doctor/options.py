"""How `diagnose` runs a pipeline: the options the command line and the Python API share. The command line's
help for each option is the `help` of its field here."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path


@dataclass
class RunOptions:
    """How `diagnose` runs a pipeline; the command line's options say the same, in its help."""

    out_dir: Path = field(default=Path("reports"), metadata={"help": "reports folder: <pipeline>/<run-id>/ go in it"})
    examples: int | str | None = field(
        default="auto",
        metadata={
            "help": "rehearsal size: training examples analysed, a seeded subsample; auto sizes it to a tenth of "
            "the projected full run, at least 256 examples"
        },
    )
    queries: int | None = field(default=16, metadata={"help": "query examples analysed"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present), cpu or cuda"})
    seed: int | None = field(default=None, metadata={"help": "override the pipeline's seed"})
    progress: bool = field(default=True, metadata={"help": "progress on stderr, a line per stage and remedy"})
    run_id: str | None = field(default=None, metadata={"help": "name of the run's folder (default: a timestamp)"})
    fix: bool = field(default=True, metadata={"help": "apply remedies to heal what the diagnosis finds"})
    probe_examples: int = field(
        default=64,
        metadata={"help": "examples in the float64 precision and 10x-damping probes; 0 turns them off"},
    )
    memory_budget: float | None = field(
        default=None,
        metadata={"help": "memory a stage may use at full size, e.g. 12G or 800M (default: the device's memory)"},
    )
    prior_seconds: float = field(
        default=0.0,
        metadata={"help": "seconds spent before diagnose() that a full run spends too (the CLI's imports)"},
    )


def help_of(name: str) -> str:
    """The one-line help of a RunOptions field, as the command line shows it."""
    return next(f.metadata["help"] for f in fields(RunOptions) if f.name == name)
