"""Per-stage progress on stderr: a line when a stage starts and one when it ends, with its time."""

from __future__ import annotations

import sys
from typing import TextIO

MARKS = {
    "ok": "✓",
    "warn": "!",
    "fail": "✗",
    "error": "✗",
    "skipped": "·",
    "not-run": "·",
    "interrupted": "✗",
}


class StageProgress:
    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr

    @property
    def interactive(self) -> bool:
        """Whether nested progress bars (kronfluence's, training's) are worth drawing."""
        return self.enabled and hasattr(self.stream, "isatty") and self.stream.isatty()

    def note(self, text: str) -> None:
        if self.enabled:
            print(f"influence-doctor: {text}", file=self.stream, flush=True)

    def start(self, stage: str) -> None:
        """On a terminal, say which stage is running (kronfluence's bars follow); logs get end lines only."""
        if self.interactive:
            print(f"  … {stage:<20} running", file=self.stream, flush=True)

    def end(self, stage: str, status: str, seconds: float | None = None, detail: str = "") -> None:
        if self.enabled:
            timing = f"{seconds:7.2f}s" if seconds is not None else " " * 8
            mark = MARKS.get(status, "?")
            line = f"  {mark} {stage:<20} {status:<8} {timing}  {detail}".rstrip()
            print(line, file=self.stream, flush=True)
