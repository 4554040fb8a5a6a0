"""TARGET loading: good targets give a Pipeline; every bad one is one sentence and exit 2."""

from __future__ import annotations

import pytest

from influence_doctor import Pipeline
from influence_doctor.errors import UsageError
from influence_doctor.targets import load_target


def test_module_attr_pipeline_and_factory():
    assert isinstance(load_target("tests.pipelines:SMALL"), Pipeline)
    assert load_target("tests.pipelines:small").name == "small"


def test_file_path_target(tmp_path):
    target = tmp_path / "my_pipeline.py"
    target.write_text(
        "from tests.pipelines import small_pipeline\ndef build():\n    return small_pipeline(name='from-file')\n"
    )
    assert load_target(f"{target}:build").name == "from-file"


@pytest.mark.parametrize(
    ("target", "phrase"),
    [
        ("no-colon-here", "must look like"),
        ("tests.pipelines:", "must look like"),
        ("no_such_package_xyz.module:thing", "cannot be found"),
        ("tests.pipelines:missing_attr", "has no attribute"),
        ("tests.pipelines:not_a_pipeline", "not an influence_doctor.Pipeline"),
        ("tests.pipelines:factory_that_raises", "the dataset server is down"),
        ("does/not/exist.py:build", "does not exist"),
        ("tests.pipelines:ROOT_NOT_THERE.sub", "has no attribute"),
    ],
)
def test_bad_targets_raise_one_clear_sentence(target, phrase):
    with pytest.raises(UsageError) as caught:
        load_target(target)
    message = str(caught.value)
    assert phrase in message
    assert "\n" not in message


def test_file_that_fails_to_import(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import definitely_not_installed_module_xyz\n")
    with pytest.raises(UsageError, match="failed to import"):
        load_target(f"{broken}:anything")


def test_non_callable_non_pipeline(tmp_path):
    constant = tmp_path / "constant.py"
    constant.write_text("VALUE = 3\n")
    with pytest.raises(UsageError, match="is a int, not a Pipeline"):
        load_target(f"{constant}:VALUE")


@pytest.mark.parametrize(
    "args",
    [
        ("diagnose", "tests.pipelines:missing_attr"),
        ("diagnose", "no_such_package_xyz:thing"),
        ("diagnose", "nowhere/file.py:build"),
        ("diagnose", "tests.pipelines:not_a_pipeline"),
        ("diagnose", "--demo", "no-such-demo"),
        ("diagnose", "--examples", "0"),
        ("diagnose", "--device", "tpu"),
        ("diagnose", "--bogus-flag"),
        ("no-such-command",),
        ("diagnose", "tests.pipelines:small", "--demo", "conv"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(cli, args):
    done = cli(*args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("influence-doctor: error: ")
    assert done.stdout == ""
