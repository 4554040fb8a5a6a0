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
    assert config.make_thresholds() == Thresholds()


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
    assert config.make_thresholds().scores.outlier_mad == 50.0


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


CONFIG_KEYS = (
    # covariance
    "headroom_warn_fraction",
    "overflow_measure_share",
    "overflow_measure_min_seconds",
    "symmetry_eps",
    "symmetry_max",
    "negative_diagonal_eps",
    "dead_unit_eps",
    "dead_unit_warn_fraction",
    # eigendecomposition (and Λ's conditioning)
    "orthogonality_eps",
    "reconstruction_eps",
    "negative_eigenvalue_eps",
    "effective_rank_eps",
    "rank_deficient_fraction",
    "max_condition_error",
    "damping_floor_eps",
    # scores
    "outlier_mad",
    "self_outlier_mad",
    "query_scale_ratio",
    "negative_self_influence_eps",
    "module_dominance_share",
    "damping_sensitivity_min_spearman",
    # precision
    "precision_min_spearman",
    "precision_error_sqrt_eps",
    "precision_tie_eps",
    "hooks_error_sqrt_eps",
    "seed_min_spearman",
    # before any factor
    "preflight_eigh_seconds",
    "contract_rtol_sqrt_eps",
    "min_tracked_share",
    # training
    "loss_window_fraction",
    "loss_window_min_steps",
    "loss_rise_significance",
    "divergence_ratio",
    "divergence_significance",
    "loss_rise_fail_significance",
    "start_rise_ratio",
    "start_rise_significance",
    "trained_loss_warn_ratio",
    "trained_loss_fail_ratio",
    "trained_loss_unreferenced_fail_ratio",
    "uphill_cosine",
    "sample_rise_significance",
    "uphill_gradient_alpha",
    "explosion_height",
    "divergence_min_share",
    "oscillation_significance",
    "oscillation_min_amplitude",
    "oscillation_max_progress",
    "max_generalization_gap",
)
"""The flat keys of [tool.influence-doctor.thresholds]: users' pyproject.toml files name these, so the
grouping of `Thresholds` must not rename one."""


def test_the_config_keys_are_the_flat_threshold_names():
    assert Thresholds.names() == CONFIG_KEYS
    assert list(Thresholds().flat()) == list(CONFIG_KEYS)


@pytest.mark.parametrize("name", CONFIG_KEYS)
def test_every_config_key_round_trips(name):
    default = Thresholds().value(name)
    changed = default * 2 + 1
    thresholds = Thresholds.from_mapping({name: changed})
    assert thresholds.value(name) == changed
    assert thresholds.flat() == {**Thresholds().flat(), name: changed}  # nothing else moved


def test_all_config_keys_at_once(tmp_path):
    body = "".join(f"{name} = {index + 0.5}\n" for index, name in enumerate(CONFIG_KEYS))
    config = load_config(_write(tmp_path, "[tool.influence-doctor.thresholds]\n" + body))
    assert config.make_thresholds().flat() == {name: index + 0.5 for index, name in enumerate(CONFIG_KEYS)}


def test_an_unknown_threshold_is_rejected_naming_the_known_ones():
    with pytest.raises(ValueError, match="unknown threshold 'outlier'") as caught:
        Thresholds.from_mapping({"outlier_mad": 1e5, "outlier": 3})
    assert all(name in str(caught.value) for name in CONFIG_KEYS)
    with pytest.raises(ValueError, match="unknown threshold 'scores'"):  # a group is not a key
        Thresholds.from_mapping({"scores": 1.0})
    with pytest.raises(ValueError, match="unknown threshold 'outlier'"):
        Thresholds().value("outlier")
