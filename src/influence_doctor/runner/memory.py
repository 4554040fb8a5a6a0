"""Peak memory of a block of work: what a stage really held, measured, for the projection to start from.

On a GPU, the CUDA caching allocator's own peak of allocated bytes (reset at the start of the block).
On the CPU, the process's resident set size, sampled every few milliseconds by a background thread while
the block runs (Linux /proc/self/statm; elsewhere only the lifetime maximum is available, and the block's
peak is then unknown). Both are absolute: the stage's peak includes the model, data and whatever the
process already held, which is what has to fit in the device's memory.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType

SAMPLE_SECONDS = 0.002
"""Sampling interval on the CPU: short enough to catch a per-batch tensor that lives a few milliseconds."""

_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """The process's current resident set size, or None where /proc is not available."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def device_memory_bytes(device: str) -> int | None:
    """What the device has in all: the GPU's memory, or the host's RAM (MemTotal)."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "sysconf"):
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError):
            return None
    return None


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` then `peak.peak_bytes` (None when it cannot be measured)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.kind = "cuda_allocated" if device.startswith("cuda") else "rss"
        self.start_bytes: int | None = None
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda_allocated":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = self.peak_bytes = int(torch.cuda.memory_allocated(self.device))
            return self
        self.start_bytes = self.peak_bytes = resident_bytes()
        if self.start_bytes is not None:
            self._thread = threading.Thread(target=self._sample, name="influence-doctor-memory", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._observe()
            self._stop.wait(SAMPLE_SECONDS)

    def _observe(self) -> None:
        current = resident_bytes()
        if current is not None and (self.peak_bytes is None or current > self.peak_bytes):
            self.peak_bytes = current

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.kind == "cuda_allocated":
            import torch

            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._observe()

    def to_dict(self) -> dict[str, int | str | None]:
        return {"kind": self.kind, "start_bytes": self.start_bytes, "peak_bytes": self.peak_bytes}
