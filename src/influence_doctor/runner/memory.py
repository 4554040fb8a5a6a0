"""Peak memory of a block of work: what a stage really held, measured, for the projection to start from.

On a GPU, the CUDA caching allocator's own peak of allocated bytes (reset at the start of the block).
On the CPU, the process's resident set size, sampled every few milliseconds while the block runs by one
background thread that the process keeps (it sleeps between blocks: starting a thread per stage cost a
millisecond, which a small pipeline's stage notices) (Linux /proc/self/statm; elsewhere the block's peak
is unknown). The kernel's own high-water mark is not used: resetting it would change what the user's
process reports as its peak. Both are absolute: the stage's peak includes the model, data and whatever the
process already held, which is what has to fit in the device's memory.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from types import TracebackType

SAMPLE_SECONDS = 0.002
"""Sampling interval on the CPU: short enough to catch a per-batch tensor that lives a few milliseconds."""

_STATM = "/proc/self/statm"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_statm: tuple[int, int] | None = None  # (pid, open descriptor): a read is then one pread, ~1 µs


def resident_bytes() -> int | None:
    """The process's current resident set size, or None where /proc is not available."""
    global _statm
    try:
        if _statm is None or _statm[0] != os.getpid():  # a forked child must read its own /proc entry
            _statm = (os.getpid(), os.open(_STATM, os.O_RDONLY))
        return int(os.pread(_statm[1], 128, 0).split()[1]) * _PAGE
    except (OSError, ValueError, IndexError, AttributeError):
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


class _Sampler:
    """One daemon thread that samples the resident set size for every active PeakMemory block."""

    def __init__(self) -> None:
        self._blocks: set[PeakMemory] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, block: PeakMemory) -> None:
        with self._lock:
            self._blocks.add(block)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="influence-doctor-memory", daemon=True)
                self._thread.start()
        self._wake.set()

    def remove(self, block: PeakMemory) -> None:
        with self._lock:
            self._blocks.discard(block)
            if not self._blocks:
                self._wake.clear()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            current = resident_bytes()
            with self._lock:
                blocks = list(self._blocks)
            for block in blocks:
                block.observe(current)
            time.sleep(SAMPLE_SECONDS)


_SAMPLER = _Sampler()


class PeakMemory:
    """`with PeakMemory(device) as peak: ...` then `peak.peak_bytes` (None when it cannot be measured)."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.kind = "cuda_allocated" if device.startswith("cuda") else "rss"
        self.start_bytes: int | None = None
        self.peak_bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda_allocated":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = self.peak_bytes = int(torch.cuda.memory_allocated(self.device))
            return self
        self.start_bytes = self.peak_bytes = resident_bytes()
        if self.start_bytes is not None:
            _SAMPLER.add(self)
        return self

    def observe(self, current: int | None) -> None:
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
        _SAMPLER.remove(self)
        self.observe(resident_bytes())

    def to_dict(self) -> dict[str, int | str | None]:
        return {"kind": self.kind, "start_bytes": self.start_bytes, "peak_bytes": self.peak_bytes}
