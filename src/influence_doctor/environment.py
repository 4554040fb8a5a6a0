"""What a report must record to be reproduced: versions, device, determinism, the user's git commit."""

from __future__ import annotations

import functools
import os
import platform
import random
import subprocess
from pathlib import Path
from typing import Any


def seed_everything(seed: int) -> None:
    """Seed every generator a run touches, so two runs with one seed compute the same numbers."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(requested: str) -> str:
    """`auto` picks CUDA when present; asking for CUDA without it is a usage error."""
    import torch

    from influence_doctor.errors import UsageError

    if requested not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, not {requested!r}.")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device on this machine.")
    return requested


def git_commit(directory: Path) -> dict[str, Any]:
    """Commit and dirtiness of the repository holding `directory`; None outside a git checkout."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=directory, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = None if commit is None else bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"commit": commit, "dirty": dirty}


def describe_environment(device: str, seed: int) -> dict[str, Any]:
    """The environment block of a report: facts about this process gathered once (versions, the CPU,
    the git commit: a CI suite diagnosing twenty pipelines asks git once), plus this run's own."""
    import torch

    return {
        **_process_facts(str(Path.cwd())),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "seed": seed,
        "deterministic": {
            "torch_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        },
        **_world(),
        "speed": speed_calibration(device),
    }


@functools.cache
def _process_facts(cwd: str) -> dict[str, Any]:
    import kronfluence
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "kronfluence": getattr(kronfluence, "__version__", None),
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "git": git_commit(Path(cwd)),
        "machine": machine_identity(),
    }


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_identity() -> dict[str, Any]:
    """What decides how fast a stage runs: the CPU model and cores, the GPU and its memory. Two reports
    whose identities differ were timed on different machines."""
    import torch

    gpu = torch.cuda.is_available()
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "gpu_name": torch.cuda.get_device_name(0) if gpu else None,
        "gpu_memory_bytes": int(torch.cuda.get_device_properties(0).total_memory) if gpu else None,
    }


SPEED_MATMUL_SIZE = 256
SPEED_EIGH_SIZE = 128


def speed_calibration(device: str) -> dict[str, float]:
    """A few milliseconds of fixed work on the run's device, measured in every run: the fastest of five
    float32 256² matmuls and of five float64 128² eighs (the factor stages' two kinds of work), in ms.
    Recorded beside the timings so a reader sees how fast the machine was when it ran."""
    import time

    import torch

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(SPEED_MATMUL_SIZE, SPEED_MATMUL_SIZE, generator=generator).to(device)
    s = torch.randn(SPEED_EIGH_SIZE, SPEED_EIGH_SIZE, generator=generator, dtype=torch.float64)
    s = (s @ s.T).to(device)

    def fastest(work: Any) -> float:
        best = float("inf")
        for _ in range(5):
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            work()
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
        return 1000.0 * best

    return {"matmul_ms": fastest(lambda: a @ a), "eigh_ms": fastest(lambda: torch.linalg.eigh(s))}


def _world() -> dict[str, Any]:
    """Under torchrun: how many ranks ran, which one wrote the report, over which backend."""
    from influence_doctor.distributed import WRITER, current

    world = current()
    return {"world_size": world.size, "rank": WRITER if world.distributed else world.rank, "backend": world.backend}


def process_age() -> float:
    """Seconds since this process started (Linux /proc; 0 where unknown): what a command line spent on
    its imports before any work, which a full run of it spends too."""
    import os

    try:
        with open("/proc/self/stat", encoding="ascii") as stream:
            fields = stream.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime", encoding="ascii") as stream:
            uptime = float(stream.read().split()[0])
        return max(uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0
