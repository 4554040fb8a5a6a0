"""Small SVG charts written as text: lines, points, step histograms and horizontal bars.

The report draws a handful of simple charts; a plotting library would cost more to import and render
than a small pipeline's whole kronfluence run. These functions are pure (numbers in, markup out),
take milliseconds, and give crisp, self-contained figures that need nothing outside the page.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 58, 12, 24, 34
FONT = "font-family='system-ui,sans-serif'"


@dataclass
class Series:
    label: str
    x: Sequence[float]
    y: Sequence[float]
    style: str = "line"  # "line", "points" or "steps" (a histogram's outline: x are bin edges, len(y)+1)
    colour: str | None = None


@dataclass
class Rule:
    """A horizontal reference line across the plot (a damping, a floor, a limit)."""

    value: float
    label: str
    colour: str = "#000"
    dash: str = "5,3"


@dataclass
class _Scale:
    low: float
    high: float
    log: bool
    pixels: tuple[float, float]  # where low and high land

    def __post_init__(self) -> None:
        # value → pixel is affine in t(value): computed once, since a chart maps thousands of points.
        a, b = self._t(self.low), self._t(self.high)
        span = self.pixels[1] - self.pixels[0]
        self._slope = 0.0 if b == a else span / (b - a)
        self._offset = self.pixels[0] + (0.5 * span if b == a else -a * self._slope)

    def __call__(self, value: float) -> float:
        return self._offset + (math.log10(value) if self.log else value) * self._slope

    def _t(self, value: float) -> float:
        return math.log10(value) if self.log else value

    def ticks(self) -> list[float]:
        if self.log:
            first, last = math.floor(math.log10(self.low)), math.ceil(math.log10(self.high))
            step = max(1, math.ceil((last - first) / 6))
            return [10.0**k for k in range(first, last + 1, step) if self.low <= 10.0**k <= self.high]
        return nice_ticks(self.low, self.high)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 × 10^k apart) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low] if math.isfinite(low) else []
    raw = (high - low) / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    start = math.ceil(low / step) * step
    ticks, value = [], start
    while value <= high + step * 1e-9:
        ticks.append(0.0 if abs(value) < step * 1e-9 else value)
        value += step
    return ticks


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-2:
        return f"{value:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{value:g}"


def _extent(values: Sequence[float], log: bool) -> tuple[float, float] | None:
    usable = [v for v in values if math.isfinite(v) and (v > 0 or not log)]
    if not usable:
        return None
    low, high = min(usable), max(usable)
    if low == high:
        low, high = (low / 2, high * 2) if log else (low - 0.5 - abs(low) * 0.1, high + 0.5 + abs(high) * 0.1)
    elif not log:
        pad = (high - low) * 0.04
        low, high = low - pad, high + pad
    return low, high


@dataclass
class Chart:
    """One plot: series, reference rules, axes; `render()` gives an <svg> element."""

    title: str = ""
    subtitle: str = ""
    x_label: str = ""
    y_label: str = ""
    x_log: bool = False
    y_log: bool = False
    width: int = 330
    height: int = 220
    series: list[Series] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    legend: bool = True

    def render(self) -> str:
        xs = [x for s in self.series for x in s.x]
        ys = [y for s in self.series for y in s.y] + [r.value for r in self.rules]
        x_range, y_range = _extent(xs, self.x_log), _extent(ys, self.y_log)
        parts = [
            f"<svg width='{self.width}' height='{self.height}' "
            f"viewBox='0 0 {self.width} {self.height}' role='img' aria-label='{html.escape(self.title)}'>",
            f"<text x='{self.width / 2}' y='14' text-anchor='middle' font-size='11' {FONT}>"
            f"{html.escape(self.title)}</text>",
        ]
        if self.subtitle:
            parts.append(
                f"<text x='{self.width / 2}' y='26' text-anchor='middle' font-size='9' {FONT}>"
                f"{html.escape(self.subtitle)}</text>"
            )
        if x_range is None or y_range is None:
            parts.append(
                f"<text x='{self.width / 2}' y='{self.height / 2}' text-anchor='middle' font-size='11' "
                f"{FONT}>nothing finite to draw</text></svg>"
            )
            return "".join(parts)
        left, right = MARGIN_LEFT, self.width - MARGIN_RIGHT
        top, bottom = MARGIN_TOP + (10 if self.subtitle else 0), self.height - MARGIN_BOTTOM
        sx = _Scale(*x_range, self.x_log, (left, right))
        sy = _Scale(*y_range, self.y_log, (bottom, top))
        parts.append(
            f"<rect x='{left}' y='{top}' width='{right - left}' height='{bottom - top}' "
            "fill='none' stroke='#999' stroke-width='0.8'/>"
        )
        parts += self._axes(sx, sy, left, right, top, bottom)
        colours = iter(PALETTE * 4)
        for series in self.series:
            colour = series.colour or next(colours)
            series.colour = colour
            parts.append(_draw(series, sx, sy, colour, y_range, self.y_log))
        for rule in self.rules:
            if (rule.value > 0 or not self.y_log) and y_range[0] <= rule.value <= y_range[1]:
                y = sy(rule.value)
                parts.append(
                    f"<line x1='{left}' x2='{right}' y1='{y:.1f}' y2='{y:.1f}' stroke='{rule.colour}' "
                    f"stroke-dasharray='{rule.dash}' stroke-width='1'/>"
                )
        if self.legend:
            parts += self._legend(right)
        parts.append("</svg>")
        return "".join(parts)

    def _axes(self, sx: _Scale, sy: _Scale, left: float, right: float, top: float, bottom: float) -> list[str]:
        parts = _x_ticks(sx, bottom)
        for tick in sy.ticks():
            y = sy(tick)
            parts.append(
                f"<line x1='{left - 4}' x2='{left}' y1='{y:.1f}' y2='{y:.1f}' stroke='#666'/>"
                f"<text x='{left - 6}' y='{y + 3:.1f}' text-anchor='end' font-size='9' {FONT}>"
                f"{_label(tick)}</text>"
            )
        parts.append(
            f"<text x='{(left + right) / 2}' y='{self.height - 4}' text-anchor='middle' font-size='10' "
            f"{FONT}>{html.escape(self.x_label)}</text>"
        )
        parts.append(
            f"<text x='12' y='{(top + bottom) / 2}' text-anchor='middle' font-size='10' {FONT} "
            f"transform='rotate(-90 12 {(top + bottom) / 2})'>{html.escape(self.y_label)}</text>"
        )
        return parts

    def _legend(self, right: float) -> list[str]:
        entries = [(s.label, s.colour or "#000", "") for s in self.series if s.label]
        entries += [(r.label, r.colour, r.dash) for r in self.rules if r.label]
        parts = []
        for row, (label, colour, dash) in enumerate(entries):
            y = MARGIN_TOP + 10 + 11 * row
            x = right - 6
            parts.append(
                f"<line x1='{x - 14 - 5.2 * len(label)}' x2='{x - 4 - 5.2 * len(label)}' y1='{y - 3}' "
                f"y2='{y - 3}' stroke='{colour}' stroke-width='2' stroke-dasharray='{dash}'/>"
                f"<text x='{x}' y='{y}' text-anchor='end' font-size='9' {FONT}>{html.escape(label)}</text>"
            )
        return parts


def _draw(series: Series, sx: _Scale, sy: _Scale, colour: str, y_range: tuple[float, float], y_log: bool) -> str:
    def usable(x: float, y: float) -> bool:
        return math.isfinite(x) and math.isfinite(y) and (y > 0 or not y_log)

    if series.style == "points":
        points = [(sx(x), sy(y)) for x, y in zip(series.x, series.y, strict=False) if usable(x, y)]
        dots = _format_points("<circle cx='%.1f' cy='%.1f' r='1.6'/>", points)
        return f"<g fill='{colour}' fill-opacity='0.55'>{dots}</g>"
    if series.style == "steps":
        base = y_range[0]
        points = []
        for index, y in enumerate(series.y):
            level = sy(y if usable(1.0, y) else base)
            points += [(sx(series.x[index]), level), (sx(series.x[index + 1]), level)]
        path = _format_points("%.1f,%.1f ", points).rstrip()
        return f"<polyline points='{path}' fill='none' stroke='{colour}' stroke-width='1.2' stroke-opacity='0.85'/>"
    points = [(sx(x), sy(y)) for x, y in zip(series.x, series.y, strict=False) if usable(x, y)]
    path = _format_points("%.1f,%.1f ", points).rstrip()
    return f"<polyline points='{path}' fill='none' stroke='{colour}' stroke-width='1.3'/>"


def _format_points(pattern: str, points: list[tuple[float, float]]) -> str:
    """`pattern` (two %.1f fields) repeated for every point, in one formatting call: a chart has thousands."""
    return (pattern * len(points)) % tuple(value for point in points for value in point)


def _x_ticks(sx: _Scale, bottom: float) -> list[str]:
    """Tick marks and labels along the bottom axis."""
    return [
        f"<line x1='{sx(tick):.1f}' x2='{sx(tick):.1f}' y1='{bottom}' y2='{bottom + 4}' stroke='#666'/>"
        f"<text x='{sx(tick):.1f}' y='{bottom + 14}' text-anchor='middle' font-size='9' {FONT}>{_label(tick)}</text>"
        for tick in sx.ticks()
    ]


def histogram(label: str, counts: Sequence[float], edges: Sequence[float]) -> Series:
    """A step outline of bin `counts` over the bins `edges` (one more edge than counts)."""
    if len(edges) != len(counts) + 1:
        raise ValueError(f"{len(edges)} edges for {len(counts)} counts")
    return Series(label, list(edges), [float(c) for c in counts], style="steps")


def bar_chart(
    rows: Sequence[tuple[str, float, str, str]],
    *,
    x_label: str = "",
    x_log: bool = False,
    rules: Sequence[Rule] = (),
    width: int = 660,
) -> str:
    """Horizontal bars: (label, value, colour, text after the bar), one row each, top to bottom."""
    height = MARGIN_TOP + MARGIN_BOTTOM + 18 * max(len(rows), 1)
    values = [v for _, v, _, _ in rows] + [r.value for r in rules]
    extent = _extent(values + ([] if x_log else [0.0]), x_log)
    if extent is None:
        return Chart(title="", width=width, height=height).render()
    low, high = extent
    if not x_log:
        low = min(0.0, *values)  # a linear bar starts at zero
    high = high * (3 if x_log else 1.5)  # room for the text after each bar
    left = max(MARGIN_LEFT, 6 * max((len(label) for label, *_ in rows), default=0) + 10)
    right = width - MARGIN_RIGHT
    sx = _Scale(low, high, x_log, (left, right))
    parts = [f"<svg width='{width}' height='{height}' viewBox='0 0 {width} {height}' role='img'>"]
    for row, (label, value, colour, text) in enumerate(rows):
        y = MARGIN_TOP + 18 * row
        end = sx(value) if math.isfinite(value) and (value > 0 or not x_log) else left
        parts.append(
            f"<text x='{left - 6}' y='{y + 12}' text-anchor='end' font-size='9' {FONT}>"
            f"{html.escape(label)}</text>"
            f"<rect x='{left}' y='{y + 3}' width='{max(end - left, 1):.1f}' height='12' fill='{colour}'/>"
            f"<text x='{max(end, left) + 4:.1f}' y='{y + 12}' font-size='9' {FONT}>{html.escape(text)}</text>"
        )
    bottom = height - MARGIN_BOTTOM
    for rule in rules:
        x = sx(rule.value)
        parts.append(
            f"<line x1='{x:.1f}' x2='{x:.1f}' y1='{MARGIN_TOP}' y2='{bottom}' stroke='{rule.colour}' "
            f"stroke-dasharray='{rule.dash}'/><text x='{x + 3:.1f}' y='{MARGIN_TOP - 4}' font-size='9' "
            f"fill='{rule.colour}' {FONT}>{html.escape(rule.label)}</text>"
        )
    parts += _x_ticks(sx, bottom)
    parts.append(
        f"<line x1='{left}' x2='{right}' y1='{bottom}' y2='{bottom}' stroke='#999'/>"
        f"<text x='{(left + right) / 2}' y='{height - 4}' text-anchor='middle' font-size='10' {FONT}>"
        f"{html.escape(x_label)}</text></svg>"
    )
    return "".join(parts)
