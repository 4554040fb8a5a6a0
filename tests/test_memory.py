"""PeakMemory on the CPU: the peak of a short-lived allocation inside the block is caught."""

from __future__ import annotations

import time

import pytest
import torch

from influence_doctor.runner.memory import _SAMPLER, PeakMemory, resident_bytes

pytestmark = pytest.mark.skipif(resident_bytes() is None, reason="needs /proc/self/statm")

MIB = 2**20


def _spike(megabytes: int, seconds: float) -> None:
    block = torch.ones(megabytes * MIB // 4)  # written, so resident
    time.sleep(seconds)
    del block


def test_a_transient_allocation_is_in_the_peak_and_gone_from_the_end():
    with PeakMemory("cpu") as peak:
        _spike(256, 0.05)
    assert peak.start_bytes is not None and peak.peak_bytes is not None
    assert peak.peak_bytes - peak.start_bytes >= 200 * MIB
    assert resident_bytes() < peak.peak_bytes - 100 * MIB  # freed again: a peak, not the final size


def test_nested_blocks_each_see_their_own_peak_and_the_sampler_sleeps_afterwards():
    with PeakMemory("cpu") as outer:
        _spike(128, 0.03)
        with PeakMemory("cpu") as inner:
            time.sleep(0.02)
    assert outer.peak_bytes - outer.start_bytes >= 100 * MIB
    assert inner.peak_bytes - inner.start_bytes < 64 * MIB
    assert not _SAMPLER._wake.is_set()
