"""Home of hand-written influence checks; `make influence-check` also collects the configured pipelines."""

from __future__ import annotations

import pytest


@pytest.mark.influence
def test_default_demo_configuration_is_sick_before_healing(influence_doctor):
    """The tiny-lm demo as configured (fp16, damping 1e-8) must be diagnosed, not silently accepted."""
    from influence_doctor.demos import load_demo

    report = influence_doctor.diagnose(load_demo("tiny-lm"), fix=False, examples=256, probe_examples=0)
    assert report.status == "sick"
    assert report.problems[0].cause == "fp16-overflow"
