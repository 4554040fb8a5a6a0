"""[tool.influence-doctor] config: defaults, overrides reaching the checks, and bad keys as exit 2."""

from __future__ import annotations

import pytest

from influence_doctor.checks.thresholds import Thresholds
from influence_doctor.config import Gates, load_config
from influence_doctor.errors import UsageError


def _write(tmp_path, body: str):
    path = tmp_path / "pyproject.toml"
    path.write_text(body)
    return path


def test_missing_table_gives_defaults(tmp_path):
    config = load_config(_write(tmp_path, "[project]\nname = 'x'\n"))
    assert config.reports_dir == "reports"
    assert config.gates == Gates()
    assert config.make_thresholds().outlier_mad == Thresholds().outlier_mad


def test_spec_example_parses_and_thresholds_override(tmp_path):
    config = load_config(
        _write(
            tmp_path,
            """
[tool.influence-doctor]
pipelines = ["tests.pipelines:small"]
reports_dir = "out"
baseline_dir = "out/baselines"

[tool.influence-doctor.gates]
fail_on = "warn"
allow_remedies = false
max_condition_number = 1e10
min_score_spearman = 0.9
max_seconds_ratio = 3.0

[tool.influence-doctor.thresholds]
outlier_mad = 50
""",
        )
    )
    assert config.pipelines == ("tests.pipelines:small",)
    assert config.gates.fail_on == "warn" and config.gates.allow_remedies is False
    assert config.make_thresholds().outlier_mad == 50.0


@pytest.mark.parametrize(
    ("body", "phrase"),
    [
        ("[tool.influence-doctor]\nreport_dir = 'x'\n", "has no key 'report_dir'"),
        ("[tool.influence-doctor.gates]\nfail_when = 'warn'\n", "has no key 'fail_when'"),
        ("[tool.influence-doctor.gates]\nfail_on = 'info'\n", "fail_on must be"),
        ("[tool.influence-doctor.thresholds]\noutlier = 3\n", "unknown threshold 'outlier'"),
        ("[tool.influence-doctor]\npipelines = 'a:b'\n", "must be a list"),
        ("[tool.influence-doctor\n", "Cannot read"),
    ],
)
def test_bad_config_is_one_sentence(tmp_path, body, phrase):
    with pytest.raises(UsageError, match=phrase) as caught:
        load_config(_write(tmp_path, body))
    assert "\n" not in str(caught.value)


def test_cli_rejects_unknown_config_key_with_exit_2(cli, tmp_path):
    _write(tmp_path, "[tool.influence-doctor.thresholds]\nno_such_threshold = 1\n")
    done = cli("diagnose", "--demo", "uci-mlp", "--quiet", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no_such_threshold" in done.stderr
    assert "Traceback" not in done.stderr


def test_threshold_from_config_changes_the_verdict(cli, tmp_path):
    """A config limit reaches the checks: demanding exactly orthonormal float32 eigenvectors fails a
    healthy pipeline (the measured ‖QᵀQ−I‖ is a few float32 roundings, never 0)."""
    _write(tmp_path, "[tool.influence-doctor.thresholds]\northogonality_eps = 0.0\n")
    done = cli("diagnose", "tests.pipelines:small", "--quiet", "--no-fix", "--probe-examples", "0", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "eigendecomposition.orthogonality" in done.stdout
    assert (tmp_path / "reports" / "small").is_dir()  # reports_dir default, relative to the cwd
