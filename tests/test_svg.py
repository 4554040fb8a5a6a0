"""The report's SVG charts: pure functions, checked on what they must and must not draw."""

from __future__ import annotations

import math
import re

import pytest

from influence_doctor.report.svg import Chart, Rule, Series, bar_chart, histogram, nice_ticks


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (0.0, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        (-3.0, 7.0, [-2.0, 0.0, 2.0, 4.0, 6.0]),
        (0.0, 47.0, [0, 10, 20, 30, 40]),
    ],
)
def test_nice_ticks_are_round_and_inside_the_range(low, high, expected):
    assert nice_ticks(low, high) == pytest.approx(expected)


def test_nice_ticks_of_an_empty_range_do_not_loop():
    assert nice_ticks(2.0, 2.0) == [2.0] and nice_ticks(math.nan, 1.0) == []


def _points(svg: str) -> list[tuple[float, float]]:
    (path,) = re.findall(r"<polyline points='([^']*)'", svg)
    return [tuple(map(float, pair.split(","))) for pair in path.split()]


def test_a_log_chart_drops_what_a_log_axis_cannot_show_and_draws_rules_in_range():
    chart = Chart(title="spectrum", y_log=True)
    chart.series.append(Series("λ", [0, 1, 2, 3], [100.0, 1.0, 0.0, math.nan]))
    chart.rules += [Rule(0.5, "damping"), Rule(1e-9, "far below the data")]
    svg = chart.render()
    assert len(_points(svg)) == 2  # 0 and NaN are not drawn on a log axis
    assert svg.count("stroke-dasharray='5,3'") >= 1 and "damping" in svg
    y_top, y_bottom = _points(svg)[0][1], _points(svg)[1][1]
    assert y_top < y_bottom  # larger values higher up


def test_a_chart_with_nothing_finite_says_so():
    chart = Chart(title="empty")
    chart.series.append(Series("x", [0, 1], [math.inf, math.nan]))
    assert "nothing finite to draw" in chart.render()


def test_histogram_needs_one_more_edge_than_counts():
    series = histogram("scores", [1, 4, 2], [0.0, 1.0, 2.0, 3.0])
    assert series.style == "steps" and series.y == [1.0, 4.0, 2.0]
    with pytest.raises(ValueError, match="edges"):
        histogram("scores", [1, 2], [0.0, 1.0])


def test_bar_chart_draws_one_bar_per_row_and_escapes_labels():
    svg = bar_chart([("a<b", 2.0, "#000", "two"), ("c", 1.0, "#111", "one")], x_label="seconds")
    assert svg.count("<rect") == 2 and "a&lt;b" in svg and "<b" not in svg.replace("<svg", "")
    widths = [float(w) for w in re.findall(r"<rect x='[^']*' y='[^']*' width='([^']*)'", svg)]
    assert widths[0] == pytest.approx(2 * widths[1], rel=0.01)
