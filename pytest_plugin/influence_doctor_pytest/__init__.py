"""pytest plugin: `pytest --influence-check` turns every configured pipeline into test items.

Thin on purpose: without --influence-check it only registers its options and the `influence` marker,
and imports nothing heavy (no torch, kronfluence, scipy or hypothesis); the session machinery lives in
`session.py` and is imported only when the check is switched on.
"""

from __future__ import annotations

from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("influence-doctor", "influence function health checks")
    group.addoption(
        "--influence-check",
        action="store_true",
        default=False,
        help="run every pipeline of [tool.influence-doctor] as test items (one per stage, plus gates)",
    )
    group.addoption(
        "--influence-pipeline",
        action="append",
        default=[],
        metavar="TARGET",
        help="also check this pipeline ('pkg.module:attr' or 'path/file.py:attr'); repeatable",
    )
    group.addoption(
        "--influence-update-baseline",
        action="store_true",
        default=False,
        help="write the reports of the pipelines that ran as the new baselines",
    )
    group.addoption("--influence-reports", metavar="DIR", default=None, help="reports folder (default: config)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "influence: an influence-function check; skipped unless pytest runs with --influence-check"
    )
    config.addinivalue_line("markers", "xdist_group(name): keep a pipeline's items on one pytest-xdist worker")
    if config.getoption("influence_check"):
        from influence_doctor_pytest.session import InfluenceSession

        config.pluginmanager.register(InfluenceSession(config), "influence-doctor-session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("influence_check"):
        return
    skip = pytest.mark.skip(reason="influence checks run only with --influence-check")
    for item in items:
        if "influence" in item.keywords or "influence_doctor" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


@pytest.fixture
def influence_doctor(request: pytest.FixtureRequest) -> Any:
    """Run the doctor from a hand-written test: `influence_doctor.diagnose(pipeline_or_target, **kwargs)`."""
    if not request.config.getoption("influence_check"):
        pytest.skip("influence checks run only with --influence-check")
    from influence_doctor_pytest.session import HandDoctor

    return HandDoctor(request.config)
