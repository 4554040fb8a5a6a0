"""When each batch went through the model: the per-batch cost of a stage, measured inside the stage.

kronfluence loops over batches inside one call; the doctor sees only the call's total. A forward
pre-hook on the model stamps the clock each time a batch enters it, so the intervals between stamps
are what one batch costs in that stage (forward, backward, kronfluence's hooks), measured on the
rehearsal's own batches rather than inferred from two totals whose difference is mostly noise.
On a GPU the stamps are taken when the host issues the work; over many batches the host is held to
the device's pace by the bounded launch queue, so the median interval still reads the device's time.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any


class ForwardClock:
    """`with ForwardClock(model) as clock: ...` then `clock.stamps` (perf_counter at each forward)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.stamps: list[float] = []
        self._handle: Any = None

    def __enter__(self) -> ForwardClock:
        stamps = self.stamps
        try:
            self._handle = self.model.register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))
        except (AttributeError, RuntimeError):  # not an nn.Module: nothing to time, the totals remain
            self._handle = None
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._handle is not None:
            self._handle.remove()
