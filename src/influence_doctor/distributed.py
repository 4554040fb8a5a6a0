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
