"""report.html: one self-contained page (plots embedded as PNG) for a person to look at rather than read.

Seven figures with stable ids (FIGURES): the loss curve; spectra per module before and after every
remedy, damping and the dtype's resolution floor marked; headroom of accumulated quantities; the
evidence behind each cause; fidelity scatters (healed vs reference, final vs exact, or as configured
vs float64 on the probe); the remedy timeline; score histograms before and after. matplotlib is
imported only when a figure is drawn.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

from tabulate import tabulate

from influence_doctor.report.text import (
    finding_rows,
    influence_lines,
    remedy_rows,
    score_rows,
    show_number,
    stage_rows,
    status_words,
)

MAX_SPECTRA = 6
"""Modules drawn in the spectra figure, worst conditioned first (every number is in report.json)."""

MAX_SCATTER_POINTS = 4000
"""Score pairs drawn in a fidelity scatter: an evenly spaced sample, so large score matrices stay light."""

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:70rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.2rem .5rem;font-size:.9rem}
th{background:#f3f3f3}.healthy{color:#176b2c}.healed{color:#1f5fa8}.sick{color:#b3261e}
pre{background:#f6f6f6;padding:.7rem}img{max-width:100%}
"""


FIGURES = ("loss", "spectra", "headroom", "evidence", "fidelity", "remedy-timeline", "scores")
"""The figures' stable ids, in page order: tests and users link to them (report.html#fidelity)."""


def render_html(
    document: dict[str, Any],
    run: Any = None,
    snapshots: list[Any] | None = None,
    probe_scores: dict[str, tuple[Any, Any]] | None = None,
) -> str:
    """The report as HTML. `run` supplies the final tensors; `snapshots` every configuration the doctor
    ran (as configured, then after each rung) for the before/after plots; `probe_scores` maps a score
    kind to (configured, float64) scores on the probe, the fidelity of a run no remedy touched."""
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
    if document["remedies"]:
        parts += [
            "<h2>Remedies</h2>",
            _table(remedy_rows(document), ["#", "cause", "rung", "change", "re-ran", "outcome", "seconds"]),
        ]
    if findings := finding_rows(document):
        parts += ["<h2>Findings</h2>", _table(findings, ["severity", "stage", "check", "subject", "cause", "message"])]
    parts += ["<h2>Figures</h2>", *render_figures(document, run, snapshots, probe_scores)]
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
    run: Any = None,
    snapshots: list[Any] | None = None,
    probe_scores: dict[str, tuple[Any, Any]] | None = None,
) -> list[str]:
    """One <figure> per id in FIGURES, each with a caption and either a plot or the reason there is none."""
    snapshots = list(snapshots or [])
    if not snapshots and run is not None:
        from influence_doctor.remedies.heal import snapshot

        snapshots = [snapshot(run, "as configured")]
    makers = {
        "loss": ("Training loss", lambda: _loss_figure(document)),
        "spectra": ("Eigenvalue spectra per module, before and after every remedy", lambda: _spectra_figure(snapshots)),
        "headroom": ("Headroom: largest |entry| as a share of its dtype's max", lambda: _headroom_figure(document)),
        "evidence": ("Evidence: the experiment behind each cause", lambda: _evidence(document["pipeline"])),
        "fidelity": (
            "Fidelity: how far the scores moved",
            lambda: _fidelity_figure(document, run, snapshots, probe_scores),
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


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _png(fig: Any, alt: str) -> str:
    """The figure as an embedded PNG (self-contained: no external resource)."""
    plt = _pyplot()
    try:
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
    finally:
        plt.close(fig)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{encoded}'>"


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


def _loss_curve(ax: Any, document: dict[str, Any]) -> bool:
    curve = document["stages"][0]["metrics"].get("curve") or {}
    loss = [v if isinstance(v, float) else math.nan for v in curve.get("loss", [])]
    if not loss:
        return False
    ax.plot(curve["steps"], loss, lw=0.8, label="train")
    validation = [
        (s, v) for s, v in zip(curve["steps"], curve.get("validation_loss", []), strict=False) if isinstance(v, float)
    ]
    if validation:
        ax.plot(*zip(*validation, strict=True), "o-", ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    return True


MAX_HEADROOM_BARS = 12
"""Accumulated quantities drawn, closest to their dtype's max first."""
HEADROOM_FLOOR = 1e-6
"""Quantities projected below this share of their dtype's max (float32 sums, mostly) are not drawn."""


def _headroom(ax: Any, document: dict[str, Any]) -> bool:
    """Each accumulated quantity at the rehearsal and projected to the full run, as a share of its
    dtype's max (1 = overflow), closest to overflowing first."""
    rows = [
        h
        for h in (document.get("projection") or {}).get("headroom", [])
        if h.get("dtype_max") and h["max_projected"] / h["dtype_max"] >= HEADROOM_FLOOR
    ]
    rows = sorted(rows, key=lambda h: h["max_projected"] / h["dtype_max"], reverse=True)[:MAX_HEADROOM_BARS]
    if not rows:
        return False
    labels = [f"{h['subject']} ({h['dtype']})" for h in rows][::-1]
    rehearsal = [max(h["max_rehearsal"] / h["dtype_max"], HEADROOM_FLOOR) for h in rows][::-1]
    projected = [h["max_projected"] / h["dtype_max"] for h in rows][::-1]
    positions = range(len(rows))
    ax.barh([p + 0.2 for p in positions], projected, height=0.4, label="projected, full run")
    ax.barh([p - 0.2 for p in positions], rehearsal, height=0.4, label="measured, rehearsal")
    ax.axvline(1.0, color="red", lw=1, label="dtype max (overflow)")
    ax.set_xscale("log")
    ax.set_yticks(list(positions), labels, fontsize=6)
    ax.set_xlabel("largest |entry| / dtype max")
    ax.legend(fontsize=6)
    return True


def _loss_figure(document: dict[str, Any]) -> str:
    curve = document["stages"][0]["metrics"].get("curve") or {}
    if not curve.get("loss"):
        return _note(
            "No training loss was logged: the model was analysed as built, or its train function "
            "does not call monitor.log()."
        )
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.2))
    _loss_curve(ax, document)
    return _png(fig, "training loss")


def _spectra_figure(snapshots: list[Any]) -> str:
    """Small multiples, worst-conditioned modules first: one line per configuration the doctor ran, the
    final damping (dashed) and the precondition dtype's resolution floor eps·λmax (dotted)."""
    final = snapshots[-1].spectra if snapshots else {}
    if not final:
        return _note("No spectrum: the eigendecomposition or lambda stage did not complete.")
    order = sorted(final, key=lambda module: final[module].condition, reverse=True)[:MAX_SPECTRA]
    plt = _pyplot()
    columns = min(3, len(order))
    rows = (len(order) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(order) :]:
        ax.axis("off")
    for ax, module in zip(axes.flat, order, strict=False):
        positive = [
            v for snap in snapshots if module in snap.spectra for v in snap.spectra[module].eigenvalues if v > 0
        ]
        bottom = min(positive) / 10 if positive else 1e-30
        for snap in snapshots:
            spectrum = snap.spectra.get(module)
            if spectrum is None:
                continue
            values = [v if math.isfinite(v) and v > bottom else bottom for v in spectrum.eigenvalues]
            ranks = [i * (spectrum.count - 1) / max(len(values) - 1, 1) for i in range(len(values))]
            ax.semilogy(ranks, values, lw=1, label=snap.label)
        spectrum = final[module]
        if math.isfinite(spectrum.damping) and spectrum.damping > 0:
            ax.axhline(spectrum.damping, color="k", ls="--", lw=0.8, label=f"damping {spectrum.damping:.2g}")
        if math.isfinite(spectrum.floor) and spectrum.floor > 0:
            ax.axhline(spectrum.floor, color="r", ls=":", lw=0.8, label=f"{spectrum.dtype} floor")
        ax.set_title(f"{module} ({spectrum.count})", fontsize=8)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5)
    return _png(fig, "eigenvalue spectra")


def _headroom_figure(document: dict[str, Any]) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.4))
    if _headroom(ax, document):
        return _png(fig, "headroom")
    plt.close(fig)
    rows = [
        [stage["name"], subject, metrics.get("dtype", ""), show_number(metrics["headroom_used"])]
        for stage in document["stages"]
        for subject, metrics in (stage.get("metrics", {}).get("checks") or {}).items()
        if isinstance(metrics, dict) and isinstance(metrics.get("headroom_used"), float)
    ]
    rows = sorted(rows, key=lambda row: -float(row[3]) if row[3] not in ("", "—") else 0.0)[:MAX_HEADROOM_BARS]
    note = _note(
        "Measured on this run (nothing to project: it saw every training example, or nothing came "
        "near its dtype's max)."
    )
    return note + (_table(rows, ["stage", "quantity", "dtype", "largest |entry| / dtype max"]) if rows else "")


def _scatter_pairs(document: dict[str, Any], run: Any, snapshots: list[Any], probe_scores: Any) -> list[tuple]:
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
                    pairs.append(
                        (f"{kind}: healed vs {reference.label}", reference.label, x, "healed", y, rank_agreement(y, x))
                    )
    exact = getattr(run, "exact_pairwise", None) if run is not None else None
    if exact is not None:
        approx, truth = exact
        pairs.append(
            ("pairwise: final vs exact influence", "exact", truth, "final", approx, rank_agreement(approx, truth))
        )
    if not pairs and probe_scores:
        for kind, (configured, reference64) in probe_scores.items():
            if configured is not None and reference64 is not None and configured.shape == reference64.shape:
                pairs.append(
                    (
                        f"{kind} on the probe: as configured vs float64",
                        "float64",
                        reference64,
                        "as configured",
                        configured,
                        rank_agreement(configured, reference64),
                    )
                )
    return pairs


def _fidelity_figure(document: dict[str, Any], run: Any, snapshots: list[Any], probe_scores: Any) -> str:
    import torch

    pairs = _scatter_pairs(document, run, snapshots, probe_scores)
    if not pairs:
        return _note("Nothing to compare: no remedy changed the scores and the probes were off.")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.4 * len(pairs), 3.2), squeeze=False)
    for ax, (title, x_label, x, y_label, y, spearman) in zip(axes.flat, pairs, strict=True):
        x, y = x.double().flatten().cpu(), y.double().flatten().cpu()
        keep = torch.isfinite(x) & torch.isfinite(y)
        x, y = x[keep], y[keep]
        if x.numel() > MAX_SCATTER_POINTS:
            index = torch.linspace(0, x.numel() - 1, MAX_SCATTER_POINTS).long()
            x, y = x[index], y[index]
        ax.scatter(x.numpy(), y.numpy(), s=3, alpha=0.5)
        ax.set_title(f"{title}\nSpearman {spearman:.4f}", fontsize=7)
        ax.set_xlabel(x_label, fontsize=7)
        ax.set_ylabel(y_label, fontsize=7)
        ax.tick_params(labelsize=6)
    rows = [[title, f"{spearman:.4f}"] for title, *_, spearman in pairs]
    return _png(fig, "fidelity scatter") + _table(rows, ["comparison", "Spearman"])


OUTCOME_COLOURS = {
    "healed": "#176b2c",
    "resolved": "#4c9a5b",
    "not-resolved": "#b37400",
    "error": "#b3261e",
    "exhausted": "#888888",
}


def _timeline_figure(document: dict[str, Any]) -> str:
    remedies = document.get("remedies") or []
    if not remedies:
        return _note(
            "No rung was tried: nothing treatable was diagnosed"
            + ("." if document["status"] != "sick" else ", or --no-fix was given.")
        )
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.45 * len(remedies)))
    start = 0.0
    for row, remedy in enumerate(remedies):
        seconds = remedy.get("seconds") or 0.0
        ax.barh(row, max(seconds, 1e-3), left=start, color=OUTCOME_COLOURS.get(remedy["outcome"], "#1f5fa8"))
        ax.text(
            start + seconds, row, f"  {remedy['rung']} → {remedy['outcome']} ({seconds:.1f} s)", va="center", fontsize=7
        )
        start += seconds
    ax.set_yticks(
        range(len(remedies)), [f"#{i + 1} {r.get('cause') or ''}" for i, r in enumerate(remedies)], fontsize=7
    )
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first rung")
    ax.set_xlim(0, max(start * 1.6, 1.0))
    skipped = [
        [f"#{i + 1}", entry.get("rung", ""), entry.get("reason", "")]
        for i, remedy in enumerate(remedies)
        for entry in remedy.get("skipped") or []
    ]
    table = _table(skipped, ["before rung", "rung skipped or rejected", "why"]) if skipped else ""
    return _png(fig, "remedy timeline") + table


def _scores_figure(snapshots: list[Any]) -> str:
    import torch

    kinds = [kind for kind in ("pairwise", "self") if snapshots and kind in snapshots[-1].scores]
    if not kinds:
        return _note("No scores: the score stages did not complete.")
    shown = [snapshots[0], snapshots[-1]] if len(snapshots) > 1 else snapshots
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.0), squeeze=False)
    for ax, kind in zip(axes.flat, kinds, strict=True):
        for snap in shown:
            values = snap.scores.get(kind)
            if values is None:
                continue
            values = values.double().flatten().cpu()
            finite = values[torch.isfinite(values)]
            share = finite.numel() / max(values.numel(), 1)
            if finite.numel():
                ax.hist(finite.numpy(), bins=60, alpha=0.55, label=f"{snap.label} ({share:.0%} finite)")
            else:
                ax.plot([], [], label=f"{snap.label}: no finite score")
        ax.set_yscale("log")
        ax.set_title(kind, fontsize=8)
        ax.set_xlabel("score", fontsize=7)
        ax.legend(fontsize=6)
    return _png(fig, "score histograms")
