"""ReportData -> one self-contained HTML page (inline CSS, figures as data: URIs, no scripts).

Every string from the run is escaped with ``html.escape``; numbers go through the ``fmt_*``
helpers so a value reads the same in every table: scores and accuracies with 4 decimals,
seconds with 1, missing values as an em dash.
"""

from __future__ import annotations

import math
import numbers
import re
from html import escape

import pandas as pd

from . import figures
from .data import DistillData, ReportData, TargetSection

MISSING = "\u2014"
TRIAL_COLUMNS = ("trial_id", "teacher_id", "method", "lam", "tau", "eps", "lr", "epochs",
                 "val_acc", "test_acc", "seconds", "status")
ACC_COLUMNS = ("val_acc", "test_acc")

STYLE = """
body{font:14px/1.45 -apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0 auto;max-width:1200px;
padding:0 20px 40px;color:#222}
h1{font-size:24px;margin:24px 0 4px}h2{font-size:20px;border-bottom:2px solid #ddd;padding-bottom:4px;
margin-top:36px}h3{font-size:16px;margin-top:24px}
.sub{color:#666;margin:0 0 12px}nav{background:#f6f6f6;padding:8px 12px;border-radius:4px}
nav a{margin-right:14px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.top td{background:#eef6ee;font-weight:600}tr.error td{background:#fdf0f0}
td.reason{color:#a00;max-width:480px;word-break:break-word}
.notes{border-left:4px solid #e0a000;background:#fff8e5;padding:8px 12px;margin:12px 0}
.note{color:#7a5a00;background:#fff8e5;padding:6px 10px;border-left:4px solid #e0a000}
.caption{color:#555;font-size:13px;max-width:1000px}
img{max-width:100%;height:auto;display:block;margin:8px 0}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:2px 16px}dl.facts dt{font-weight:600}
dl.facts dd{margin:0}
"""


# --------------------------------------------------------------------------- formatting

def _missing(v) -> bool:
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    try:
        return isinstance(v, float) and math.isnan(v)
    except TypeError:
        return False


def fmt_score(v) -> str:
    """Scores and accuracies: 4 decimals (as the CLI's ranking); missing: an em dash."""
    if _missing(v):
        return MISSING
    try:
        return f"{float(v):.4f}"
    except (TypeError, ValueError):
        return str(v)


def fmt_seconds(v) -> str:
    """Seconds: 1 decimal; under 1 s 3 (a teacher scored in 0.017 s is not "0.0")."""
    if _missing(v):
        return MISSING
    v = float(v)
    return f"{v:.1f}" if abs(v) >= 1 or v == 0 else f"{v:.3f}"


def fmt_int(v) -> str:
    return MISSING if _missing(v) else str(int(v))


def fmt_value(v) -> str:
    """Anything else (settings, hyper-parameters): ints as ints, floats with 4 significant digits."""
    if _missing(v):
        return MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int) or (hasattr(v, "dtype") and getattr(v.dtype, "kind", "") in "iu"):
        return str(int(v))
    if isinstance(v, float) or (hasattr(v, "dtype") and getattr(v.dtype, "kind", "") == "f"):
        v = float(v)
        return f"{v:.1f}" if abs(v) >= 1000 else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt_value(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt_value(x)}" for k, x in v.items())
    return str(v)


def _format_cell(col: str, v, metrics) -> tuple[str, bool]:
    """(text, numeric) for one table cell of column ``col``."""
    if col == "error":
        return ("" if _missing(v) else str(v)), False
    if col in metrics or col in ACC_COLUMNS:
        return fmt_score(v), True
    if col == "seconds":
        return fmt_seconds(v), True
    if col in ("rank", "samples", "epochs"):
        return fmt_int(v), True
    if isinstance(v, numbers.Number) and not isinstance(v, bool) and not _missing(v):
        return fmt_value(v), True
    return fmt_value(v), False


# --------------------------------------------------------------------------- html pieces

def e(s) -> str:
    return escape(str(s), quote=True)


def anchors(prefix: str, names: list[str]) -> dict[str, str]:
    """A distinct, URL-safe element id for each name (``target-<name>``, ``-2``... on clashes)."""
    out, used = {}, set()
    for name in names:
        base = f"{prefix}-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", str(name)).strip("-") or "x")
        aid, n = base, 1
        while aid in used:
            n += 1
            aid = f"{base}-{n}"
        used.add(aid)
        out[name] = aid
    return out


def img(b64: str, alt: str) -> str:
    return f'<img alt="{e(alt)}" src="data:image/png;base64,{b64}">'


def figure_html(fig, alt: str) -> str:
    return "" if fig is None else img(figures.png_base64(fig), alt)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def note(text: str) -> str:
    return f'<p class="note">{e(text)}</p>'


def facts_list(items: list[tuple[str, str]]) -> str:
    """A definition list of (label, already formatted value) pairs."""
    rows = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in items)
    return f'<dl class="facts">{rows}</dl>'


def table(df: pd.DataFrame, columns: list[str], metrics=(), row_class=None, row_attr=None) -> str:
    head = "".join(f"<th>{e(c)}</th>" for c in columns)
    body = []
    for _, r in df.iterrows():
        cells = []
        for c in columns:
            text, numeric = _format_cell(c, r.get(c), metrics)
            cls = ' class="num"' if numeric else (' class="reason"' if c == "error" else "")
            cells.append(f"<td{cls}>{e(text)}</td>")
        cls = row_class(r) if row_class else ""
        attr = (f' class="{cls}"' if cls else "") + (row_attr(r) if row_attr else "")
        body.append(f"<tr{attr}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# --------------------------------------------------------------------------- sections

def run_facts(data: ReportData) -> str:
    run, t = data.run, data.run.get("timings") or {}
    n_teachers = data.ranking["teacher_id"].nunique()
    n_errors = int((data.ranking["status"] != "ok").sum())
    items = [("run folder", data.run_uri)]
    if "zoo" in run:
        items.append(("zoo", run["zoo"]))
    items.append(("targets", str(len(data.targets))))
    if "teachers_scored" in t:
        items.append(("teachers scanned (this run)", fmt_int(t["teachers_scored"])))
    items.append(("teachers in the ranking", str(n_teachers)))
    if "pairs" in t:
        items.append(("(teacher, target) pairs", fmt_int(t["pairs"])))
    items.append(("errors", fmt_int(run["errors"]) if "errors" in run else str(n_errors)))
    if "complete" in run:
        items.append(("complete", fmt_value(run["complete"])))
    for key, label in (("total_seconds", "assess wall time (s)"), ("data_seconds", "target loading (s)"),
                       ("scan_seconds", "scan (s)")):
        if key in t:
            items.append((label, fmt_seconds(t[key])))
    if "samples_per_second" in t:
        items.append(("samples/s", fmt_value(t["samples_per_second"])))
    for k, v in (run.get("settings") or {}).items():
        items.append((f"setting: {k}", fmt_value(v)))
    for k, v in (run.get("versions") or {}).items():
        items.append((f"version: {k}", fmt_value(v)))
    out = ['<section id="facts"><h2>Run</h2>', facts_list(items)]
    if data.targets:
        rows = pd.DataFrame([{"target": s.name, "uri": s.uri, "classes": len(s.classes) or None,
                              "samples": s.samples, "class names": ", ".join(s.classes[:12])
                              + (" \u2026" if len(s.classes) > 12 else ""),
                              "teachers ok": len(s.ok), "errors": len(s.errors)}
                             for s in data.targets])
        out.append(table(rows, list(rows.columns)))
    workers = [w for w in run.get("workers") or [] if isinstance(w, dict)]
    if workers:
        out.append("<h3>Workers</h3>")
        df = pd.DataFrame(workers)
        out.append(table(df, list(df.columns)))
    out.append("</section>")
    return "".join(out)


def _bridge_html(s: TargetSection) -> str:
    out = [f"<h3>Label-space bridge of the top teacher"
           f"{': ' + e(s.top_teacher) if s.top_teacher else ''}</h3>"]
    b = s.bridge
    if b is not None:
        fig, n_rows, n_cols = figures.bridge_heatmaps(b)
        out.append(figure_html(fig, f"cost matrix and mean transport plan of {b.teacher_id} on {b.target}"))
        k, c = len(b.teacher_classes), len(b.target_classes)
        shown = (f"all {k} teacher classes" if n_rows == k else
                 f"the {n_rows} of {k} teacher classes with the most transported mass, heaviest first")
        shown += f" and {'all ' + str(c) if n_cols == c else f'{n_cols} of {c}'} target classes"
        out.append(
            f'<p class="caption">Recomputed now from the zoo on the {e(b.split)} split '
            f"({b.samples} images). Left: ground cost M (teacher class \u00d7 target class, lower = "
            f"closer). Right: mean transport plan J[k, c] = (1/N) \u03a3<sub>i</sub> p<sub>ik</sub> "
            f"[y<sub>i</sub> = c] from each teacher prediction to its one-hot target label. "
            f"Showing {e(shown)}. Mean transport cost \u27e8J, M\u27e9 = {fmt_score(b.transport_cost)}"
            + _scan_cost(s) + ".</p>")
    if s.bridge_note:
        out.append(note(s.bridge_note))
    return "".join(out)


def _scan_cost(s: TargetSection) -> str:
    """The scan's -sctd_cost for the top teacher, to compare with the recomputed <J, M>."""
    if "sctd_cost" not in s.table or not len(s.ok):
        return ""
    v = s.ok.iloc[0]["sctd_cost"]
    return "" if _missing(v) else f" (the scan's \u2212sctd_cost: {fmt_score(-float(v))})"


def target_section(data: ReportData, s: TargetSection, aid: str) -> str:
    metrics = data.metrics
    out = [f'<section id="{aid}"><h2>Target: {e(s.name)}</h2>',
           f'<p class="sub">{plural(len(s.ok), "teacher")} scored, {plural(len(s.errors), "error")}; ranked by '
           f"<b>{e(data.rank_by)}</b> (rank 1 = most related).</p>"]
    out.append(figure_html(figures.score_bars(s.table, data.rank_by),
                           f"top teachers by {data.rank_by} on {s.name}"))
    base = [c for c in ("rank", "teacher_id", "architecture", "status") if c in s.table]
    tail = [c for c in ("samples", "seconds", "worker") if c in s.table]
    cols = base + metrics + tail + (["error"] if len(s.errors) and "error" in s.table else [])
    out.append(table(
        s.table, cols, metrics,
        row_class=lambda r: "error" if r["status"] != "ok" else
        ("top" if s.top_teacher is not None and str(r["teacher_id"]) == s.top_teacher else ""),
        row_attr=lambda r: f' data-teacher="{e(r["teacher_id"])}"'))
    if len(s.errors):
        out.append("<h3>Errors</h3><ul>" + "".join(
            f"<li><b>{e(r['teacher_id'])}</b>: {e(fmt_value(r.get('error')))}</li>"
            for _, r in s.errors.iterrows()) + "</ul>")
    if s.students_left_out:
        out.append(note(f"Left out of this ranking: {plural(len(s.students_left_out), 'student')} "
                        f"distilled on this target (they have seen its labels): "
                        f"{', '.join(s.students_left_out)}."))
    out.append(_bridge_html(s))
    out.append("</section>")
    return "".join(out)


def distill_section(d: DistillData, aid: str = "distill") -> str:
    title = "Distillation search" + (f": {e(d.target)}" if d.target else "")
    out = [f'<section id="{aid}"><h2>{title}</h2>']
    for n in d.notes:
        out.append(note(n))
    s = d.summary
    if s.get("complete") is False:
        out.append(note("This search was interrupted: its trials are partial and no student was "
                        "exported; `sctd scan --resume` (or `sctd distill --resume`) continues it."))
    budget, used = s.get("budget_s"), s.get("used_s")
    items = []
    if "target" in s:
        items.append(("target", fmt_value(s["target"])))
    if not _missing(budget) or not _missing(used):
        share = (f" ({100 * float(used) / float(budget):.1f}% of the budget)"
                 if not _missing(budget) and not _missing(used) and float(budget) > 0 else "")
        items.append(("budget used (s)", f"{fmt_seconds(used)} of {fmt_seconds(budget)}{share}"))
    gain = s.get("gain_vs_ce_points")
    if not _missing(gain):
        items.append(("best student vs ce (test accuracy, points)", f"{float(gain):+.1f}"))
    export = s.get("export") if isinstance(s.get("export"), dict) else {}
    if export.get("uri") or export.get("teacher_id"):
        items.append(("exported student", fmt_value(export.get("uri") or export.get("teacher_id"))))
    if d.trials is not None:
        items.append(("trials", str(len(d.trials))))
        if "seconds" in d.trials:
            items.append(("trial seconds (sum)", fmt_seconds(pd.to_numeric(d.trials["seconds"],
                                                                           errors="coerce").sum())))
    out.append(facts_list(items))
    out.append("<h3>Best student vs ce baseline</h3>")
    rows = [(name, row) for name, row in (("best student", d.best), ("ce baseline", d.ce)) if row]
    if rows:
        df = pd.DataFrame([{"": name, **{c: row.get(c) for c in TRIAL_COLUMNS if c in row}}
                           for name, row in rows])
        out.append(table(df, list(df.columns), row_attr=lambda r: f' data-role="{e(r[""])}"'))
        out.append(figure_html(figures.student_vs_baseline(d.best, d.ce),
                               "best student vs ce baseline accuracy"))
        if d.ce is None:
            out.append(note("No ce baseline trial in results.parquet."))
    else:
        out.append(note("No trial with a validation accuracy in results.parquet."))
    if d.trials is not None and len(d.trials):
        out.append("<h3>Learning curves</h3>")
        best_id = d.best.get("trial_id") if d.best else None
        fig = figures.learning_curves(d.trials, best_id)
        out.append(figure_html(fig, "validation accuracy per epoch of every trial")
                   if fig is not None else note("No trial recorded a validation curve."))
        out.append("<h3>Trials</h3>")
        trials = d.trials
        if "val_acc" in trials:
            trials = trials.assign(_a=pd.to_numeric(trials["val_acc"], errors="coerce")) \
                .sort_values("_a", ascending=False, na_position="last").drop(columns="_a")
        cols = [c for c in TRIAL_COLUMNS if c in trials] + \
            [c for c in trials.columns if c not in TRIAL_COLUMNS and c != "val_curve"]
        out.append(table(trials, cols, row_attr=lambda r: f' data-trial="{e(r.get("trial_id"))}"'))
    if s:
        out.append("<h3>summary.json</h3>")
        out.append(facts_list([(k, _summary_value(k, v)) for k, v in _flatten(s)]))
    out.append("</section>")
    return "".join(out)


def _summary_value(key: str, v) -> str:
    """Seconds with 1 decimal, accuracies and scores with 4 (as in the tables), anything else
    (hyper-parameters, points, resources) with ``fmt_value``'s 4 significant digits."""
    if isinstance(v, float) and not isinstance(v, bool):
        if key.endswith(("_s", "seconds")):
            return fmt_seconds(v)
        if key.endswith("_acc") or ".scores." in key or key.startswith("teacher_scores."):
            return fmt_score(v)
    return fmt_value(v)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Nested keys as ``a.b``; a list of objects (``teachers``) as ``teachers.0.rank``, ..."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out.extend(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.extend(_flatten(x, f"{prefix}{k}.{i}."))
        else:
            out.append((f"{prefix}{k}", v))
    return out


def render_html(data: ReportData) -> str:
    """The whole page."""
    ids = anchors("target", [s.name for s in data.targets])
    nav = ['<a href="#facts">Run</a>'] + [
        f'<a href="#{ids[s.name]}">{e(s.name)}</a>' for s in data.targets]
    dids = (anchors("distill", [d.target for d in data.distill])
            if len(data.distill) > 1 else {d.target: "distill" for d in data.distill})
    for d in data.distill:
        nav.append(f'<a href="#{dids[d.target]}">Distillation{": " + e(d.target) if d.target else ""}</a>')
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>sctd-ray report: {e(data.run_uri)}</title>", f"<style>{STYLE}</style></head><body>",
        "<h1>sctd-ray report</h1>",
        f'<p class="sub">run {e(data.run_uri)} \u00b7 written {e(data.generated_at)}</p>',
        f"<nav>{''.join(nav)}</nav>",
    ]
    if data.notes:
        parts.append('<div class="notes"><b>Notes</b><ul>'
                     + "".join(f"<li>{e(n)}</li>" for n in data.notes) + "</ul></div>")
    parts.append(run_facts(data))
    parts.extend(target_section(data, s, ids[s.name]) for s in data.targets)
    parts.extend(distill_section(d, dids[d.target]) for d in data.distill)
    parts.append("</body></html>\n")
    return "\n".join(parts)
