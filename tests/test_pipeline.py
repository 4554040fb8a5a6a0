from __future__ import annotations

import json
import math

import pytest
import torch

from influence_doctor import Pipeline, TrainingMonitor
from influence_doctor.report.strict_json import strict
from tests.pipelines import small_pipeline


def test_monitor_records_steps_and_converts_tensors():
    monitor = TrainingMonitor()
    monitor.log(torch.tensor(2.5), grad_norm=torch.tensor(1.0))
    monitor(1.5, validation_loss=1.7)
    monitor.log(float("nan"), step=10)
    assert monitor.steps == [0, 1, 10]
    assert monitor.loss[:2] == [2.5, 1.5]
    assert math.isnan(monitor.loss[2])
    assert monitor.validation_loss == [None, 1.7, None]
    assert monitor.grad_norm == [1.0, None, None]
    # NaN cannot travel in strict JSON: the report writes null, with the reason beside it.
    document = strict({"curve": monitor.to_dict()})
    assert document["curve"]["loss"][2] is None
    assert document["curve"]["loss_nonfinite"] == {"2": "nan"}
    json.loads(json.dumps(document, allow_nan=False))


def test_pipeline_defaults_to_kronfluence_arguments():
    pipeline = small_pipeline(factor_args=None, score_args=None)
    assert pipeline.factor_args.strategy == "ekfac"
    assert pipeline.score_args.damping_factor == 1e-08


@pytest.mark.parametrize(
    ("override", "phrase"),
    [
        ({"name": " "}, "non-empty"),
        ({"scores": ("pairwise", "cross")}, "unknown kinds"),
        ({"batch_size": 0}, "positive"),
    ],
)
def test_pipeline_rejects_bad_fields(override, phrase):
    with pytest.raises(ValueError, match=phrase):
        small_pipeline(**override)


def test_pipeline_module_is_light():
    """Declaring a pipeline must not need kronfluence until arguments are defaulted."""
    import subprocess
    import sys

    code = "import sys, influence_doctor; print('kronfluence' in sys.modules, 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]
    assert Pipeline is not None
