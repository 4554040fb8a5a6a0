"""report.html: one self-contained page (plots drawn as inline SVG) for a person to look at rather than read.

Seven figures with stable ids (FIGURES): the loss curve; spectra per module before and after every
remedy, damping and the dtype's resolution floor marked; headroom of accumulated quantities; the
evidence behind each cause; fidelity scatters (healed vs reference, final vs exact, or as configured
vs float64 on the probe); the remedy timeline; score histograms before and after. Charts are inline
SVG written by `report.svg`: milliseconds to draw, nothing to import, nothing outside the page.
"""

from __future__ import annotations

import html
import math
from typing import Any

from tabulate import tabulate

from influence_doctor.report.svg import Chart, Rule, Series, bar_chart, histogram
from influence_doctor.report.text import (
    advice_lines,
    finding_rows,
    influence_lines,
    remedy_rows,
    score_rows,
    show_number,
    stage_rows,
    status_words,
    treatment_chain,
)

MAX_SPECTRA = 6
"""Modules drawn in the spectra figure, worst conditioned first (every number is in report.json)."""

MAX_SCATTER_POINTS = 2000
"""Score pairs drawn in a fidelity scatter: an evenly spaced sample, so large score matrices stay light."""

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:70rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.2rem .5rem;font-size:.9rem}
th{background:#f3f3f3}.healthy{color:#176b2c}.healed{color:#1f5fa8}.sick{color:#b3261e}
pre{background:#f6f6f6;padding:.7rem}img{max-width:100%}
.charts{display:flex;flex-wrap:wrap;gap:.5rem}.note{color:#555;font-style:italic}
figure{margin:1rem 0;border-top:1px solid #ddd}figcaption{font-weight:600;margin:.4rem 0}
"""


FIGURES = ("loss", "spectra", "headroom", "evidence", "fidelity", "remedy-timeline", "scores")
"""The figures' stable ids, in page order: tests and users link to them (report.html#fidelity)."""


def render_html(
    document: dict[str, Any],
    snapshots: list[Any] | None = None,
    probe_scores: dict[str, tuple[Any, Any]] | None = None,
    exact: tuple[Any, Any] | None = None,
) -> str:
    """The report as HTML. `snapshots` are every configuration the doctor ran (as configured, then after
    each rung: `fidelity.Snapshot`) for the before/after plots; `probe_scores` maps a score kind to
    (configured, float64) scores on the probe, the fidelity of a run no remedy touched; `exact` the final
    and the exact pairwise scores, where exact influence was computed."""
    pipeline = document["pipeline"]
    status = document["status"]
    where = "<a href='#prescription'>below</a>" if status == "healed" else "<a href='#evidence'>below</a>"
    words = html.escape(status_words(status, "below")).replace("below", where, 1)
    parts = [
        f"<h1>influence-doctor: {html.escape(pipeline['name'])}</h1>",
        f"<p class='{status}'><b>{words}</b></p>",
        _table(stage_rows(document), ["stage", "status", "seconds", "findings", "detail"]),
    ]
    if python := document["prescription"].get("python"):
        parts += ["<h2 id='prescription'>Prescription</h2>", f"<pre>{html.escape(python)}</pre>"]
    if advice := advice_lines(document):
        items = "".join(f"<li>{html.escape(line.removeprefix('- '))}</li>" for line in advice)
        parts += ["<h2 id='advice'>Advice, not applied (below the fidelity bar)</h2>", f"<ul>{items}</ul>"]
    if document["remedies"]:
        parts += [
            "<h2>Remedies</h2>",
            _table(remedy_rows(document), ["#", "cause", "rung", "change", "re-ran", "outcome", "seconds"]),
        ]
        if chain := treatment_chain(document):
            parts.append(f"<p>Treatment: {html.escape(chain)}</p>")
    if findings := finding_rows(document):
        parts += ["<h2>Findings</h2>", _table(findings, ["severity", "stage", "check", "subject", "cause", "message"])]
    parts += ["<h2>Figures</h2>", *render_figures(document, snapshots, probe_scores, exact)]
    if scores := score_rows(document):
        parts += ["<h2>Scores</h2>", _table(scores, ["scores", "shape", "finite", "min", "median", "max"])]
    if influences := influence_lines(document):
        parts += ["<h2>Top influences</h2>", f"<pre>{html.escape(chr(10).join(influences))}</pre>"]
    body = "\n".join(parts)
    title = html.escape(f"influence-doctor: {pipeline['name']}")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def render_figures(
    document: dict[str, Any],
    snapshots: list[Any] | None = None,
    probe_scores: dict[str, tuple[Any, Any]] | None = None,
    exact: tuple[Any, Any] | None = None,
) -> list[str]:
    """One <figure> per id in FIGURES, each with a caption and either a plot or the reason there is none."""
    snapshots = list(snapshots or [])
    makers = {
        "loss": ("Training loss", lambda: _loss_figure(document)),
        "spectra": ("Eigenvalue spectra per module, before and after every remedy", lambda: _spectra_figure(snapshots)),
        "headroom": ("Headroom: largest |entry| as a share of its dtype's max", lambda: _headroom_figure(document)),
        "evidence": ("Evidence: the experiment behind each cause", lambda: _evidence(document["pipeline"])),
        "fidelity": (
            "Fidelity: how far the scores moved",
            lambda: _fidelity_figure(document, snapshots, probe_scores, exact),
        ),
        "remedy-timeline": ("Remedy timeline: rungs tried, skipped and why", lambda: _timeline_figure(document)),
        "scores": ("Scores before and after", lambda: _scores_figure(snapshots)),
    }
    figures = []
    for figure_id in FIGURES:
        caption, make = makers[figure_id]
        try:
            content = make()
        except Exception as exc:  # a plot that cannot be drawn says why, never fails the report
            content = _note(f"not drawn: {type(exc).__name__}: {exc}")
        figures.append(f"<figure id='{figure_id}'><figcaption>{html.escape(caption)}</figcaption>{content}</figure>")
    return figures


def _note(text: str) -> str:
    return f"<p class='note'>{html.escape(text)}</p>"


def _evidence(pipeline: dict[str, Any]) -> str:
    """Each Problem with the experiments behind its verdict: what changed, what moved, by how much."""
    diagnosis = pipeline.get("diagnosis") or []
    if not diagnosis:
        return _note("No cause was diagnosed: no experiment was needed.")
    items = []
    for problem in diagnosis:
        head = f"<b>[{html.escape(problem['cause'] or 'unexplained')}]</b> at {html.escape(problem['stage'])}: "
        basis = f" <i>(basis: {html.escape(str(problem.get('basis', '')))})</i>" if problem.get("basis") else ""
        rows = [
            [
                e["change"],
                e["measurement"],
                show_number(e["before"]),
                show_number(e["after"]),
                e["verdict"],
                str(e["examples"]),
            ]
            for e in problem.get("experiments", [])
        ]
        table = _table(rows, ["change", "measurement", "before", "after", "verdict", "examples"]) if rows else ""
        items.append(f"<li>{head}{html.escape(problem['message'])}{basis}{table}</li>")
    return f"<ul>{''.join(items)}</ul>"


def _table(rows: list[list[str]], headers: list[str]) -> str:
    return tabulate([[html.escape(str(c)) for c in row] for row in rows], headers=headers, tablefmt="unsafehtml")


MAX_HEADROOM_BARS = 12
"""Accumulated quantities drawn, closest to their dtype's max first."""
HEADROOM_FLOOR = 1e-6
"""Quantities projected below this share of their dtype's max (float32 sums, mostly) are not drawn."""

OUTCOME_COLOURS = {
    "healed": "#176b2c",
    "resolved": "#4c9a5b",
    "not-resolved": "#b37400",
    "rejected": "#8a4f9e",
    "error": "#b3261e",
    "exhausted": "#888888",
}


def _grid(charts: list[str]) -> str:
    return f"<div class='charts'>{''.join(charts)}</div>"


def _loss_figure(document: dict[str, Any]) -> str:
    curve = document["stages"][0]["metrics"].get("curve") or {}
    loss = [v if isinstance(v, float) else math.nan for v in curve.get("loss", [])]
    if not loss:
        return _note(
            "No training loss was logged: the model was analysed as built, or its train function does not call "
            "monitor.log()."
        )
    steps = curve.get("steps") or list(range(len(loss)))
    chart = Chart(title="training loss", x_label="step", y_label="loss", width=660, height=230)
    chart.series.append(Series("train", steps, loss))
    validation = [(s, v) for s, v in zip(steps, curve.get("validation_loss", []), strict=False) if isinstance(v, float)]
    if validation:
        chart.series.append(Series("validation", *zip(*validation, strict=True), style="line"))
    chart.y_log = all(v > 0 for v in loss if math.isfinite(v)) and _spans_decades(loss)
    return chart.render()


def _spans_decades(values: list[float]) -> bool:
    finite = [v for v in values if math.isfinite(v) and v > 0]
    return bool(finite) and max(finite) / min(finite) > 100


def _spectra_figure(snapshots: list[Any]) -> str:
    """Small multiples, worst-conditioned modules first: one line per configuration the doctor ran, the
    final damping (dashed) and the precondition dtype's resolution floor eps·λmax (dotted)."""
    final = snapshots[-1].spectra if snapshots else {}
    if not final:
        return _note("No spectrum: the eigendecomposition or lambda stage did not complete.")
    order = sorted(final, key=lambda module: final[module].condition, reverse=True)[:MAX_SPECTRA]
    charts = []
    for module in order:
        spectrum = final[module]
        positive = [
            v for snap in snapshots if module in snap.spectra for v in snap.spectra[module].eigenvalues if v > 0
        ]
        bottom = min([*positive, spectrum.floor if spectrum.floor > 0 else math.inf]) / 10 if positive else 1e-30
        chart = Chart(
            title=f"{module} ({spectrum.count} eigenvalues)", x_label="rank", y_label="eigenvalue", y_log=True
        )
        for snap in snapshots:
            own = snap.spectra.get(module)
            if own is None:
                continue
            values = [v if math.isfinite(v) and v > bottom else bottom for v in own.eigenvalues]
            ranks = [i * (own.count - 1) / max(len(values) - 1, 1) for i in range(len(values))]
            chart.series.append(Series(snap.label, ranks, values))
        if math.isfinite(spectrum.damping) and spectrum.damping > 0:
            chart.rules.append(Rule(spectrum.damping, f"damping {spectrum.damping:.2g}"))
        if math.isfinite(spectrum.floor) and spectrum.floor > 0:
            chart.rules.append(Rule(spectrum.floor, f"{spectrum.dtype} floor", colour="#d62728", dash="2,2"))
        charts.append(chart.render())
    more = len(final) - len(order)
    note = _note(f"{more} better-conditioned module(s) not drawn; every number is in report.json.") if more else ""
    return _grid(charts) + note


def _headroom_figure(document: dict[str, Any]) -> str:
    """Each accumulated quantity at the rehearsal and projected to the full run, as a share of its dtype's
    max (1 = overflow), closest to overflowing first; without a projection, what this run measured."""
    rows = [
        h
        for h in (document.get("projection") or {}).get("headroom", [])
        if h.get("dtype_max") and h["max_projected"] / h["dtype_max"] >= HEADROOM_FLOOR
    ]
    rows = sorted(rows, key=lambda h: h["max_projected"] / h["dtype_max"], reverse=True)[:MAX_HEADROOM_BARS]
    if rows:
        bars = []
        for h in rows:
            name = f"{h['subject']} ({h['dtype']})"
            rehearsal, projected = h["max_rehearsal"] / h["dtype_max"], h["max_projected"] / h["dtype_max"]
            bars.append((f"{name} rehearsal", max(rehearsal, HEADROOM_FLOOR), "#1f77b4", f"{rehearsal:.2g}"))
            colour = "#d62728" if projected >= 1 else "#ff7f0e"
            bars.append((f"{name} full run", max(projected, HEADROOM_FLOOR), colour, f"{projected:.2g}"))
        return bar_chart(
            bars, x_label="largest |entry| / dtype max", x_log=True, rules=[Rule(1.0, "overflow", colour="#d62728")]
        )
    measured = [
        [stage["name"], subject, metrics.get("dtype", ""), show_number(metrics["headroom_used"])]
        for stage in document["stages"]
        for subject, metrics in (stage.get("metrics", {}).get("checks") or {}).items()
        if isinstance(metrics, dict) and isinstance(metrics.get("headroom_used"), float)
    ]
    measured = sorted(measured, key=lambda row: -_float(row[3]))[:MAX_HEADROOM_BARS]
    note = _note(
        "Measured on this run (no projection: it saw every training example, or nothing came near its dtype's max)."
    )
    return note + (_table(measured, ["stage", "quantity", "dtype", "largest |entry| / dtype max"]) if measured else "")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def _scatter_pairs(document: dict[str, Any], snapshots: list[Any], probe_scores: Any, exact: Any) -> list[tuple]:
    """(title, x label, x, y label, y, Spearman) for each comparison a person would check."""
    from influence_doctor.checks.precision import rank_agreement

    pairs = []
    fix = (document.get("fidelity") or {}).get("fix") or {}
    reference = next((s for s in snapshots if s.label == fix.get("reference")), None)
    if reference is not None and len(snapshots) > 1:
        for kind in ("pairwise", "self"):
            if kind in reference.scores and kind in snapshots[-1].scores:
                x, y = reference.scores[kind], snapshots[-1].scores[kind]
                if x.shape == y.shape:
                    title = f"{kind}: healed vs {reference.label}"
                    pairs.append((title, reference.label, x, "healed", y, rank_agreement(y, x)))
    if exact is not None:
        approx, truth = exact
        pairs.append(("pairwise: final vs exact", "exact", truth, "final", approx, rank_agreement(approx, truth)))
    if not pairs and probe_scores:
        final = "final" if document.get("remedies") else "as configured"
        for kind, (configured, reference64) in probe_scores.items():
            if configured is not None and reference64 is not None and configured.shape == reference64.shape:
                spearman = rank_agreement(configured, reference64)
                pairs.append(
                    (f"{kind} (probe): {final} vs float64", "float64", reference64, final, configured, spearman)
                )
    return pairs


def _fidelity_figure(document: dict[str, Any], snapshots: list[Any], probe_scores: Any, exact: Any) -> str:
    import torch

    pairs = _scatter_pairs(document, snapshots, probe_scores, exact)
    if not pairs:
        return _note("Nothing to compare: no remedy changed the scores and the probes were off.")
    charts = []
    for title, x_label, x, y_label, y, spearman in pairs:
        x, y = x.double().flatten().cpu(), y.double().flatten().cpu()
        keep = torch.isfinite(x) & torch.isfinite(y)
        x, y = x[keep], y[keep]
        if x.numel() > MAX_SCATTER_POINTS:
            index = torch.linspace(0, x.numel() - 1, MAX_SCATTER_POINTS).long()
            x, y = x[index], y[index]
        chart = Chart(title=title, subtitle=f"Spearman {spearman:.4f}", x_label=x_label, y_label=y_label, legend=False)
        chart.series.append(Series("", x.tolist(), y.tolist(), style="points"))
        charts.append(chart.render())
    rows = [[title, f"{spearman:.4f}"] for title, *_, spearman in pairs]
    return _grid(charts) + _table(rows, ["comparison", "Spearman"])


def _timeline_figure(document: dict[str, Any]) -> str:
    remedies = document.get("remedies") or []
    if not remedies:
        tail = ", or --no-fix was given." if document["status"] == "sick" else "."
        return _note("No rung was tried: nothing treatable was diagnosed" + tail)
    bars = [
        (
            f"#{i + 1} {r.get('cause') or ''}",
            r.get("seconds") or 0.0,
            OUTCOME_COLOURS.get(r["outcome"], "#1f5fa8"),
            f"{r['rung']} → {r['outcome']} ({(r.get('seconds') or 0.0):.2g} s)",
        )
        for i, r in enumerate(remedies)
    ]
    skipped = [
        [f"#{i + 1}", entry.get("rung", ""), entry.get("reason", "")]
        for i, remedy in enumerate(remedies)
        for entry in remedy.get("skipped") or []
    ]
    table = _table(skipped, ["before rung", "rung skipped or rejected", "why"]) if skipped else ""
    return bar_chart(bars, x_label="seconds") + table


SCORE_BINS = 50
"""Histogram bins per score kind; both configurations share the bins."""


def _scores_figure(snapshots: list[Any]) -> str:
    import torch

    kinds = [kind for kind in ("pairwise", "self") if snapshots and kind in snapshots[-1].scores]
    if not kinds:
        return _note("No scores: the score stages did not complete.")
    shown = [snapshots[0], snapshots[-1]] if len(snapshots) > 1 else snapshots
    charts = []
    for kind in kinds:
        data = {}
        for snap in shown:
            values = snap.scores.get(kind)
            if values is not None:
                values = values.double().flatten().cpu()
                data[snap.label] = (values[torch.isfinite(values)], values.numel())
        chart = Chart(title=f"{kind} scores", x_label="score", y_label="count", y_log=True, width=420)
        finite = [values for values, _ in data.values() if values.numel()]
        if finite:
            low = min(float(values.min()) for values in finite)
            high = max(float(values.max()) for values in finite)
            if high <= low:
                low, high = low - 0.5, high + 0.5
            edges = [low + (high - low) * i / SCORE_BINS for i in range(SCORE_BINS + 1)]
            for label, (values, total) in data.items():
                counts = torch.histc(values, bins=SCORE_BINS, min=low, max=high).tolist()
                share = values.numel() / max(total, 1)
                chart.series.append(histogram(f"{label} ({share:.0%} finite)", counts, edges))
        charts.append(chart.render())
    return _grid(charts)
