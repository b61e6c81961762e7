"""The report's figures, drawn with matplotlib's Agg canvas and returned as base64 PNG.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot global state), so reports can
be written from any thread, on machines without a display.
"""

from __future__ import annotations

import base64
import io
import math
import warnings

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .bridge import Bridge

DPI = 100
TOP_BARS = 15          # teachers in a target's score chart
HEATMAP_ROWS = 30      # teacher classes shown in a bridge heatmap
HEATMAP_COLS = 40      # target classes shown in a bridge heatmap
ANNOTATE_CELLS = 150   # write values into heatmap cells up to this many cells
LABEL_CHARS = 24
METHOD_COLORS = {"ot": "#1f77b4", "kd": "#ff7f0e", "ce": "#7f7f7f"}
OTHER_COLOR = "#2ca02c"


def png_base64(fig: Figure) -> str:
    """Render ``fig`` to PNG and return it base64-encoded (ASCII). A character the font lacks
    (CJK, emoji in DejaVu Sans) is drawn as a box without a warning line per glyph on stderr:
    the report's tables show every name as it is."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plain(text) -> str:
    """``text`` drawn as it is: matplotlib reads a pair of '$' as mathematical text (a class
    named ``$5-$10`` would be drawn garbled, one named ``$\\frac$`` fails the whole report)."""
    return str(text).replace("$", r"\$")


def _short(label, n: int = LABEL_CHARS) -> str:
    """At most ``n`` characters, the middle cut out (names that share a long prefix keep
    their distinct ends)."""
    s = str(label)
    if len(s) > n:
        head = (n - 1) // 2
        s = s[:head] + "\u2026" + s[len(s) - (n - 1 - head):]
    return _plain(s)


def _labels(names, n: int = LABEL_CHARS) -> list[str]:
    """``_short`` of each name, longer where that is what tells two different names apart."""
    names = [str(x) for x in names]
    longest = max((len(x) for x in names), default=0)
    while True:
        out = [_short(x, n) for x in names]
        if len(set(out)) == len(set(names)) or n >= longest:
            return out
        n += 8


def score_bars(table: pd.DataFrame, metric: str, top: int = TOP_BARS) -> Figure | None:
    """Horizontal bars of the ``top`` best-ranked ok teachers' ``metric`` (rank 1 on top).
    ``table`` is one target's ranking in rank order. None when there is nothing to draw."""
    if metric not in table:
        return None
    ok = table[(table["status"] == "ok")]
    values = pd.to_numeric(ok[metric], errors="coerce")
    ok, values = ok[values.notna()].head(top), values[values.notna()].head(top)
    if not len(ok):
        return None
    labels = _labels(ok["teacher_id"], 32)[::-1]
    vals = values.to_numpy(dtype=float)[::-1]
    fig = Figure(figsize=(7.5, 0.9 + 0.32 * len(vals)), layout="constrained")
    ax = fig.add_subplot()
    colors = ["#1f77b4"] * (len(vals) - 1) + ["#d62728"]  # rank 1 in red
    bars = ax.barh(np.arange(len(vals)), vals, color=colors)
    ax.bar_label(bars, [f"{v:.4f}" for v in vals], padding=3, fontsize=7)
    ax.margins(x=0.15)
    ax.set_yticks(np.arange(len(vals)), labels, fontsize=8)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel(f"{metric} (higher = more related)")
    ax.set_title(f"top {len(vals)} teachers by {metric}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return fig


def _heat(ax, fig, matrix: np.ndarray, rows: list[str], cols: list[str], title: str, cmap: str,
          fmt: str, vmin: float, vmax: float) -> None:
    im = ax.imshow(matrix, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(np.arange(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(np.arange(len(rows)), rows, fontsize=7)
    ax.set_xlabel("target class")
    ax.set_title(title, fontsize=9)
    if matrix.size <= ANNOTATE_CELLS:  # both colour maps are dark at the top of their range
        span = (vmax - vmin) or 1.0
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=6,
                    color="white" if (v - vmin) / span > 0.6 else "black")
    fig.colorbar(im, ax=ax, shrink=0.9)


def bridge_heatmaps(bridge: Bridge, max_rows: int = HEATMAP_ROWS,
                    max_cols: int = HEATMAP_COLS) -> tuple[Figure, int, int]:
    """Side by side: the ground cost M and the mean transport plan J (teacher classes x target
    classes), on the same rows and columns (``Bridge.shown_rows/shown_cols``).
    Returns the figure and the numbers of rows and columns shown."""
    r, c = bridge.shown_rows(max_rows), bridge.shown_cols(max_cols)
    rows = _labels(bridge.teacher_classes[i] for i in r)   # tick labels
    cols = _labels(bridge.target_classes[j] for j in c)
    cost, plan = bridge.cost[np.ix_(r, c)], bridge.plan[np.ix_(r, c)]
    width = min(22.0, 2.0 + 2 * max(3.0, 0.32 * len(cols) + 1.2))
    height = min(16.0, 1.6 + 0.24 * len(rows) + 0.07 * max(len(s) for s in cols + ["x"]))
    fig = Figure(figsize=(width, max(3.0, height)), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    _heat(ax1, fig, cost, rows, cols, "ground cost M[k, c] = 1 - cos(w_k, mu_c)", "viridis_r",
          ".2f", vmin=0.0, vmax=max(1.0, float(np.nanmax(cost)) if cost.size else 1.0))
    ax1.set_ylabel(_plain(f"teacher class ({bridge.teacher_id})"))
    _heat(ax2, fig, plan, rows, cols, "mean transport plan J[k, c]", "magma_r", ".3f",
          vmin=0.0, vmax=float(np.nanmax(plan)) if plan.size and np.nanmax(plan) > 0 else 1.0)
    fig.suptitle(_plain(f"label-space bridge: {bridge.teacher_id} \u2192 {bridge.target}"), fontsize=10)
    return fig, len(rows), len(cols)


def _curve(value) -> list[float]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    return [float(v) for v in list(value) if v is not None]


def learning_curves(trials: pd.DataFrame, best_trial=None) -> Figure | None:
    """Validation accuracy per epoch of every trial (``val_curve``), one line each, coloured by
    method; the best trial drawn thick. None when no trial has a curve."""
    if trials is None or "val_curve" not in trials:
        return None
    curves = [(r, _curve(r.get("val_curve"))) for _, r in trials.iterrows()]
    curves = [(r, c) for r, c in curves if c]
    if not curves:
        return None
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    seen = set()
    for row, curve in curves:
        method = str(row.get("method", ""))
        is_best = best_trial is not None and str(row.get("trial_id")) == str(best_trial)
        label = None
        if is_best:
            label = _plain(f"best: {row.get('trial_id')} ({method})")
        elif method not in seen:
            label, _ = _plain(method or "trial"), seen.add(method)
        ax.plot(np.arange(1, len(curve) + 1), curve, color=METHOD_COLORS.get(method, OTHER_COLOR),
                linewidth=3.0 if is_best else 1.0, alpha=1.0 if is_best else 0.6,
                marker="o" if len(curve) == 1 else None, label=label, zorder=3 if is_best else 2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"learning curves of {len(curves)} trials", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def student_vs_baseline(best: dict | None, ce: dict | None) -> Figure | None:
    """Grouped bars: validation and test accuracy of the best student and of the ce baseline."""
    groups = [(name, row) for name, row in (("best student", best), ("ce baseline", ce)) if row]
    if not groups:
        return None
    fig = Figure(figsize=(5.0, 3.4), layout="constrained")
    ax = fig.add_subplot()
    width = 0.38
    for k, (col, color) in enumerate((("val_acc", "#1f77b4"), ("test_acc", "#2ca02c"))):
        vals = [pd.to_numeric(row.get(col), errors="coerce") for _, row in groups]
        x = np.arange(len(groups)) + (k - 0.5) * width
        bars = ax.bar(x, [0 if pd.isna(v) else v for v in vals], width, color=color, label=col)
        ax.bar_label(bars, ["n/a" if pd.isna(v) else f"{v:.4f}" for v in vals], fontsize=7)
    ax.set_xticks(np.arange(len(groups)), [g[0] for g in groups])
    ax.set_ylabel("accuracy")
    ax.margins(y=0.15)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig
