"""Running under `torchrun`: one process per rank, one diagnosis, one report.

Every rank runs the pipeline and checks what it computed. What the ranks must agree on goes through
this module, so no rank can take a different branch and leave the others waiting in a collective:

- findings and metrics of each stage are gathered from every rank and merged the same way on all of
  them (what one rank alone saw is kept, marked with its rank);
- decisions that rest on the clock (the rehearsal's size) or on the diagnosis (which cause, which rung)
  are taken on rank 0 and broadcast;
- only rank 0 writes files and prints the report; every rank leaves with the same exit code.

kronfluence itself distributes only on CUDA (its `State` needs `LOCAL_RANK` and a GPU, and it reduces
factors only when CUDA is available). On the CPU with gloo each rank therefore runs kronfluence on the
whole data in a folder of its own, and the doctor checks that the ranks computed the same thing.
Without an initialised process group every function here is the single-process identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

WRITER = 0
"""The rank that decides, writes the report and prints it."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == WRITER


def current() -> World:
    """The process group this process belongs to (a world of one when none is initialised)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
        backend=str(dist.get_backend()),
    )


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_environment(device: str) -> World:
    """Join the process group torchrun describes (gloo on the CPU, NCCL on CUDA), once per process."""
    import torch
    import torch.distributed as dist

    if launched_by_torchrun() and not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return current()


def kronfluence_distributes() -> bool:
    """Whether kronfluence will shard the work over the ranks (its DDP path), or each rank runs it whole."""
    from kronfluence.utils.state import State

    return State().use_distributed


def gather(value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank (so all of them can merge it the same way)."""
    world = current()
    if not world.distributed:
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def decide(value: T) -> T:
    """Rank 0's `value` on every rank: a decision taken once, that no rank can take differently."""
    world = current()
    if not world.distributed:
        return value
    import torch.distributed as dist

    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=WRITER)
    return box[0]


def agree_exit_code(code: int) -> int:
    """The largest exit code of any rank, on every rank: a sick rank makes the whole run sick."""
    return max(gather(code))


def barrier() -> None:
    world = current()
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


STATUS_ORDER = ("not-run", "ok", "warn", "fail", "error", "interrupted")
"""A stage's merged status is the worst any rank reported."""


def merge_stage(record: Any) -> None:
    """Gather one stage's findings, error and measured numbers from every rank and merge them the same
    way on all ranks: rank 0's findings, plus what another rank alone found (its subject marked with
    the rank), the worst status, and a `<stage>.ranks_agree` warning when the ranks measured different
    numbers for what should be one computation. A no-op in a single process."""
    world = current()
    if not world.distributed:
        return
    from dataclasses import replace

    from influence_doctor.findings import Finding, warn

    views = gather(
        {
            "status": record.status,
            "error": record.error,
            "findings": list(record.findings),
            "checks": _numbers(record.metrics.get("checks", {})),
        }
    )
    writer = views[WRITER]
    seen = {(f.check, f.subject, f.severity) for f in writer["findings"]}
    findings: list[Finding] = list(writer["findings"])
    differing: dict[int, float] = {}
    for rank, view in enumerate(views):
        if rank == WRITER:
            continue
        for finding in view["findings"]:
            if (finding.check, finding.subject, finding.severity) not in seen:
                findings.append(replace(finding, subject=f"rank {rank}: {finding.subject}".rstrip(": ")))
        gap = _largest_difference(writer["checks"], view["checks"])
        if gap > 0:
            differing[rank] = gap
    status = max((view["status"] for view in views), key=lambda s: STATUS_ORDER.index(s) if s in STATUS_ORDER else 0)
    record.status = status
    record.error = writer["error"] or next((view["error"] for view in views if view["error"]), None)
    record.metrics["ranks"] = {
        "world_size": world.size,
        "agree": not differing,
        "largest_relative_difference": max(differing.values(), default=0.0),
        "differing_ranks": sorted(differing),
    }
    if differing:
        findings.append(
            warn(
                f"{record.name}.ranks_agree",
                f"Rank(s) {', '.join(map(str, sorted(differing)))} measured different numbers in this stage than "
                f"rank 0 (largest relative difference {max(differing.values()):.3g}); the report is rank 0's.",
                value=max(differing.values()),
                limit=0.0,
            )
        )
    record.findings = findings


def _numbers(tree: Any, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a metrics tree, by path."""
    out: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(_numbers(value, f"{prefix}/{key}"))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        out[prefix] = float(tree)
    return out


def _largest_difference(a: dict[str, float], b: dict[str, float]) -> float:
    """Largest relative difference between two ranks' numbers; inf when they measured different things."""
    import math

    if a.keys() != b.keys():
        return math.inf
    worst = 0.0
    for key, x in a.items():
        y = b[key]
        if x == y or (math.isnan(x) and math.isnan(y)):
            continue
        scale = max(abs(x), abs(y))
        worst = max(worst, abs(x - y) / scale if math.isfinite(scale) and scale > 0 else math.inf)
    return worst


def synchronise_parameters(model: Any) -> float:
    """Give every rank rank 0's trained parameters (as DDP would) and return how far the ranks' own
    training had drifted apart: the largest absolute parameter difference over all ranks (0 when the
    ranks trained the same model)."""
    world = current()
    if not world.distributed:
        return 0.0
    import torch
    import torch.distributed as dist

    drift = 0.0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            own = tensor.detach().clone()
            dist.broadcast(tensor.data, src=WRITER)
            if own.is_floating_point() or own.is_complex():
                difference = (own.double() - tensor.detach().double()).abs().max().item() if own.numel() else 0.0
            else:
                difference = float(not torch.equal(own, tensor.detach()))
            drift = max(drift, difference)
    return max(gather(drift))


def finish() -> None:
    """Leave the process group cleanly once every rank is done (torchrun warns about leaked groups)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
