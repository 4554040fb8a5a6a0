"""report.html: one self-contained page (plots embedded as PNG) for a person to look at rather than read.

Plots: the training loss curve, the eigenvalue spectrum of every factor, and score histograms.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

from tabulate import tabulate

from influence_doctor.report.text import (
    STATUS_WORDS,
    finding_rows,
    influence_lines,
    remedy_rows,
    score_rows,
    show_number,
    stage_rows,
)

MAX_SPECTRA = 16
"""Factors plotted in the spectrum figure; larger models show the first ones (all are in report.json)."""

SPECTRUM_FLOOR = 1e-12
"""Relative eigenvalues below this are drawn on the floor (they are rounding noise in float64)."""

STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:70rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.2rem .5rem;font-size:.9rem}
th{background:#f3f3f3}.healthy{color:#176b2c}.healed{color:#1f5fa8}.sick{color:#b3261e}
pre{background:#f6f6f6;padding:.7rem}img{max-width:100%}
"""


def render_html(document: dict[str, Any], run: Any = None) -> str:
    """The report as HTML; `run` (when given) supplies the tensors the plots are drawn from."""
    pipeline = document["pipeline"]
    status = document["status"]
    parts = [
        f"<h1>influence-doctor: {html.escape(pipeline['name'])}</h1>",
        f"<p class='{status}'><b>{html.escape(STATUS_WORDS.get(status, status))}</b></p>",
        _table(stage_rows(document), ["stage", "status", "seconds", "findings", "detail"]),
    ]
    if diagnosis := document["pipeline"].get("diagnosis"):
        parts += ["<h2>Diagnosis</h2>", _evidence(diagnosis)]
    if document["remedies"]:
        parts += [
            "<h2>Remedies</h2>",
            _table(remedy_rows(document), ["#", "cause", "rung", "change", "re-ran", "outcome", "seconds"]),
        ]
    if python := document["prescription"].get("python"):
        parts += ["<h2>Prescription</h2>", f"<pre>{html.escape(python)}</pre>"]
    if findings := finding_rows(document):
        parts += ["<h2>Findings</h2>", _table(findings, ["severity", "stage", "check", "subject", "cause", "message"])]
    figures = _figures(document, run)
    if figures:
        parts += ["<h2>Plots</h2>", *figures]
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


def _evidence(diagnosis: list[dict[str, Any]]) -> str:
    """Each Problem with the experiments behind its verdict: what changed, what moved, by how much."""
    items = []
    for problem in diagnosis:
        head = f"<b>[{html.escape(problem['cause'] or 'unexplained')}]</b> at {html.escape(problem['stage'])}: "
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
        items.append(f"<li>{head}{html.escape(problem['message'])}{table}</li>")
    return f"<figure id='evidence'><ul>{''.join(items)}</ul></figure>"


def _table(rows: list[list[str]], headers: list[str]) -> str:
    return tabulate([[html.escape(str(c)) for c in row] for row in rows], headers=headers, tablefmt="unsafehtml")


def _figures(document: dict[str, Any], run: Any) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:  # plots are a convenience: the tables carry every number
        return []
    figures = []
    for title, draw, figure_id in (
        ("Training loss", lambda ax: _loss_curve(ax, document), None),
        ("Eigenvalue spectra", lambda ax: _spectra(ax, run), None),
        ("Score histograms", lambda ax: _histograms(ax, run), None),
        ("Headroom: largest |entry| as a share of its dtype's max", lambda ax: _headroom(ax, document), "headroom"),
    ):
        fig, ax = plt.subplots(figsize=(9, 3.6))
        try:
            drawn = draw(ax)
        except Exception:  # a plot that cannot be drawn is left out, never fatal
            drawn = False
        if drawn:
            ax.set_title(title)
            fig.tight_layout()
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=90)
            encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
            image = f"<img alt='{title}' src='data:image/png;base64,{encoded}'>"
            figures.append(f"<figure id='{figure_id}'>{image}</figure>" if figure_id else image)
        plt.close(fig)
    return figures


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


def _spectra(ax: Any, run: Any) -> bool:
    eigen = (run.artifacts.get("eigendecomposition") if run is not None else None) or {}
    drawn = 0
    for kind in ("activation", "gradient"):
        for module, values in list(eigen.get(f"{kind}_eigenvalues", {}).items()):
            if drawn >= MAX_SPECTRA:
                break
            lam = values.double().flip(0)
            top = float(lam.max()) if lam.numel() else 0.0
            if not math.isfinite(top) or top <= 0:
                continue
            # Relative to λmax, floored at 1e-12: zero and rounding-negative eigenvalues sit on the floor.
            ax.semilogy((lam / top).clamp_min(SPECTRUM_FLOOR).cpu().numpy(), lw=0.8, label=f"{module}/{kind}")
            drawn += 1
    if not drawn:
        return False
    ax.set_xlabel("index (largest first)")
    ax.set_ylabel("eigenvalue / largest")
    ax.legend(fontsize=6, ncol=2)
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


def _histograms(ax: Any, run: Any) -> bool:
    import torch

    from influence_doctor.report.scores import total_scores

    drawn = False
    for kind, stage in (("pairwise", "pairwise_scores"), ("self", "self_scores")):
        artifact = run.artifacts.get(stage) if run is not None else None
        if not artifact or not run.stages[stage].completed:
            continue
        values = total_scores(artifact).double().flatten()
        values = values[torch.isfinite(values)].cpu().numpy()
        if values.size:
            ax.hist(values, bins=60, alpha=0.6, label=kind)
            drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.set_xlabel("score")
        ax.legend()
    return drawn
