"""The GPU path for real: runs only where CUDA is visible (make gpu-check), skips cleanly elsewhere."""

from __future__ import annotations

import pytest
import torch

from influence_doctor import diagnose
from tests.pipelines import small_pipeline

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_pipeline_runs_and_is_checked_on_the_gpu(tmp_path):
    report = diagnose(small_pipeline(), out_dir=tmp_path, progress=False, device="cuda")
    assert report.document["environment"]["device"] == "cuda"
    assert report.status == "healthy"
    assert next(report.run.model.parameters()).is_cuda


def test_fp16_overflow_is_diagnosed_and_healed_on_the_gpu(tmp_path):
    from fixtures import load_fixture

    pipeline, expected = load_fixture("fp16_covariance_overflow")
    report = diagnose(pipeline, out_dir=tmp_path, progress=False, device="cuda")
    assert report.document["pipeline"]["diagnosis"][0]["cause"] == expected["cause"]
    assert report.status == "healed"
