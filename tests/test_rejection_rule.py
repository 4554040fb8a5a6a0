"""The rejection rule by measurement, not by stage: a rung is rejected when a measurement that passed before
it fails after it. Judged on real trials of two fixtures (no monkeypatch): a stage with a symptom of its own
still has measurements that passed, and only inf/NaN or an error upstream leaves a measurement unmade."""

from __future__ import annotations

import pytest

from fixtures import load_fixture
from influence_doctor import diagnose
from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.diagnosis.differential import passed_before, trial_symptoms
from influence_doctor.labs import Labs


def base_and_symptoms(name: str, tmp_path, lab_name: str):
    report = diagnose(load_fixture(name)[0], out_dir=tmp_path, progress=False, fix=False)
    labs = Labs(report.run, 64)
    lab = labs.rehearsal if lab_name == "rehearsal" else labs.probe
    base = lab.configured()
    return base, trial_symptoms(base, lab, Thresholds())


def test_a_stage_with_a_symptom_of_its_own_still_has_measurements_that_passed(tmp_path):
    """eigenvectors_fp16: the eigenvectors drift from orthogonality (a measured symptom at the
    eigendecomposition), but nothing there or upstream is inf/NaN. Its other measurements, and those of
    the stages it feeds, were made on finite numbers and passed: a rung that breaks one is rejected."""
    base, wrong = base_and_symptoms("eigenvectors_fp16", tmp_path, "rehearsal")
    assert ("orthogonality", "eigendecomposition") in wrong
    assert not any(kind in ("nonfinite", "raised") for kind, _stage in wrong)
    for measurement in [("negative", "eigendecomposition"), ("nonfinite", "lambda"), ("nonfinite", "pairwise_scores")]:
        assert passed_before(measurement, base, wrong), measurement
    assert not passed_before(("orthogonality", "eigendecomposition"), base, wrong)  # it failed before


@pytest.mark.parametrize("measurement", [("nonfinite", "lambda"), ("negative", "eigendecomposition")])
def test_a_measurement_made_on_inf_nan_never_passed(tmp_path, measurement):
    """fp16_covariance_overflow on the whole rehearsal: the covariance holds inf, so what the stages after
    it measured was measured on garbage. Whatever goes wrong there after a rung was hidden (revealed), not
    broken."""
    base, wrong = base_and_symptoms("fp16_covariance_overflow", tmp_path, "rehearsal")
    assert ("nonfinite", "covariance") in wrong
    assert not passed_before(measurement, base, wrong)
