"""report.html as a chart a person reads: every figure present with content, before/after comparisons
for a healed pipeline, words that match the page, and nothing fetched from outside the file."""

from __future__ import annotations

import re

import pytest

from fixtures import load_fixture
from influence_doctor import diagnose
from influence_doctor.report.html import FIGURES
from tests.pipelines import small_pipeline


def _figures(page: str) -> dict[str, str]:
    found = dict(re.findall(r"<figure id='([a-z-]+)'>(.*?)</figure>", page, flags=re.S))
    assert list(found) == list(FIGURES), list(found)
    return found


@pytest.fixture(scope="module")
def healed(tmp_path_factory):
    pipeline, _ = load_fixture("fp16_covariance_overflow")
    report = diagnose(pipeline, out_dir=tmp_path_factory.mktemp("reports"), progress=False)
    assert report.status == "healed"
    return report, (report.run_dir / "report.html").read_text()


def test_a_healed_report_has_every_figure_with_content(healed):
    _, page = healed
    figures = _figures(page)
    for figure_id in ("loss", "spectra", "fidelity", "remedy-timeline", "scores"):
        assert "<svg" in figures[figure_id] and "not drawn" not in figures[figure_id], figure_id
    assert "fp16-overflow" in figures["evidence"] and "confirms fp16-overflow" in figures["evidence"]
    assert "<table" in figures["headroom"] or "<svg" in figures["headroom"]
    assert "dtype:float32" in page  # the rung, in the remedy table and the timeline


def test_before_and_after_are_both_drawn_for_a_healed_pipeline(healed):
    report, page = healed
    assert report.document["remedies"]
    # The spectra and score figures compare the configuration as given with the healed one.
    from influence_doctor.remedies.heal import snapshot

    final = snapshot(report.run, "final")
    assert final.spectra, "the healed run has per-module spectra to draw"
    assert all(0 < len(s.eigenvalues) <= s.count for s in final.spectra.values())
    scores = _figures(page)["scores"]
    assert "as configured" in scores and "after dtype:float32" in scores  # before and after, one chart


def test_the_verdict_points_to_the_prescription_on_the_page(healed):
    _, page = healed
    assert "use the prescription <a href='#prescription'>below</a>" in page
    assert "id='prescription'" in page
    assert page.index("id='prescription'") > page.index("use the prescription")


def test_the_page_is_self_contained(healed):
    _, page = healed
    assert not re.search(r"(src|href)=['\"](https?:)?//", page)
    assert "<script" not in page and "<link" not in page


def test_a_healthy_report_compares_with_float64_and_says_why_other_figures_are_empty(tmp_path):
    report = diagnose(small_pipeline(), out_dir=tmp_path, progress=False)
    assert report.status == "healthy"
    figures = _figures((report.run_dir / "report.html").read_text())
    assert "<svg" in figures["fidelity"] and "float64" in figures["fidelity"]
    assert "No rung was tried" in figures["remedy-timeline"]
    assert "No cause was diagnosed" in figures["evidence"]
    assert "HEALTHY" in (report.run_dir / "report.html").read_text()
