"""Everything a report shows, gathered from a run folder into plain structures.

Reads ``ranking.parquet`` and ``run.json`` (the scan, SPEC 2-3), ``distill/results.parquet``
and ``distill/summary.json`` (the budgeted search, SPEC 5), and recomputes the label-space
bridge of each target's top teacher from the zoo (SPEC 1; ``bridge.py``). Missing optional
parts become notes in the page; numbers are only ever read or recomputed, never filled in.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow.parquet as pq

from ..errors import NotFound, SctdError, StoreAuthError, StoreError, StoreUnreachable
from ..data.images import DECODE_MAX_SIDE
from ..score_names import DEFAULT_RANK_BY
if TYPE_CHECKING:   # bridge.py imports torch: only when a bridge is computed
    from .bridge import Bridge

RANKING_FILE = "ranking.parquet"
RUN_FILE = "run.json"
DISTILL_PREFIX = "distill/"
DISTILL_RESULTS = "distill/results.parquet"
DISTILL_SUMMARY = "distill/summary.json"
MANIFEST_FILE = "manifest.parquet"
# ranking.parquet columns that are not scores (assess/results.py)
NON_METRIC_COLUMNS = ("target", "teacher_id", "architecture", "status", "error",
                      "rank", "samples", "seconds", "worker", "finished_at")
# keys summary.json may use to name the best trial (SPEC 5)
BEST_TRIAL_KEYS = ("best_trial_id", "best_trial")
FAILED = ("error", "failed")  # trial statuses without a usable accuracy


@dataclass
class TargetSection:
    """One target of the scan: its ranking rows (rank order, errors last) and its bridge."""

    name: str
    uri: str | None
    classes: list[str]
    samples: int | None
    table: pd.DataFrame
    top_teacher: str | None
    bridge: Bridge | None = None
    bridge_note: str | None = None
    students_left_out: list[str] = field(default_factory=list)   # distilled on it: not ranked

    @property
    def ok(self) -> pd.DataFrame:
        return self.table[self.table["status"] == "ok"]

    @property
    def errors(self) -> pd.DataFrame:
        return self.table[self.table["status"] != "ok"]


@dataclass
class DistillData:
    """The distillation search: one row per trial, the search summary, and the two trials
    the report compares (best student by validation accuracy; best ``ce`` baseline)."""

    trials: pd.DataFrame | None
    summary: dict
    best: dict | None
    ce: dict | None
    notes: list[str] = field(default_factory=list)
    target: str | None = None   # RUN/distill/<target>/ of a scan of several targets; None: RUN/distill/


@dataclass
class ReportData:
    run_uri: str
    run: dict
    ranking: pd.DataFrame
    metrics: list[str]
    rank_by: str
    targets: list[TargetSection]
    distill: list[DistillData]   # one per distilled target (empty: no RUN/distill/)
    notes: list[str] = field(default_factory=list)
    generated_at: str = ""


def _read_json(store, key: str, notes: list[str], what: str) -> dict:
    try:
        raw = json.loads(store.read_bytes(key))
    except NotFound:
        notes.append(f"{what} ({store.join(key)}) is missing.")
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        notes.append(f"{what} ({store.join(key)}) is not valid JSON: {e}.")
        return {}
    if not isinstance(raw, dict):
        notes.append(f"{what} ({store.join(key)}) does not hold a JSON object.")
        return {}
    return raw


def _read_parquet(store, key: str) -> pd.DataFrame:
    data = store.read_bytes(key)   # NotFound, StoreUnreachable, StoreAuthError: as they are
    try:
        return pq.read_table(io.BytesIO(data)).to_pandas()
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise StoreError(f"{store.join(key)}: not a readable Parquet file ({e})") from None


def metric_columns(ranking: pd.DataFrame, run: dict) -> list[str]:
    """The scores to show: run.json's settings.metrics (those present), else every numeric
    ranking column that is not bookkeeping."""
    listed = (run.get("settings") or {}).get("metrics")
    if listed:
        return [m for m in listed if m in ranking.columns]
    return [c for c in ranking.columns if c not in NON_METRIC_COLUMNS
            and pd.api.types.is_numeric_dtype(ranking[c])]


def _target_sections(ranking: pd.DataFrame, run: dict, rank_by: str) -> list[TargetSection]:
    info = run.get("targets") or {}
    names = list(info) + sorted(set(ranking["target"].astype(str)) - set(info))
    sections = []
    for name in names:
        rows = ranking[ranking["target"].astype(str) == name].copy()
        ok = rows["status"] == "ok"
        rank = pd.to_numeric(rows.get("rank"), errors="coerce") if "rank" in rows else None
        if rank is not None and rank[ok].notna().any():
            rows = rows.assign(_order=rank).sort_values(["_order", "teacher_id"], na_position="last")
        elif rank_by in rows:  # no ranks stored: order by the score itself
            rows = rows.assign(_order=-pd.to_numeric(rows[rank_by], errors="coerce").where(ok))
            rows = rows.sort_values(["_order", "teacher_id"], na_position="last")
        else:
            rows = rows.assign(_order=0)
        rows = rows.drop(columns="_order").reset_index(drop=True)
        top = rows[rows["status"] == "ok"]
        t = info.get(name) or {}
        sections.append(TargetSection(
            name=name, uri=t.get("uri"), classes=list(t.get("classes") or []),
            samples=t.get("samples"), table=rows,
            top_teacher=str(top.iloc[0]["teacher_id"]) if len(top) else None,
            students_left_out=[str(x) for x in t.get("students_left_out") or []]))
    return sections


def _attach_bridges(sections: list[TargetSection], run: dict, s3_endpoint: str | None,
                    device: str | None, notes: list[str]) -> None:
    """Recompute each target's top-teacher bridge from the zoo; explain every one that cannot be."""
    from ..zoo.store import open_store
    from .bridge import load_bridge

    zoo_uri = run.get("zoo")
    split = (run.get("settings") or {}).get("split") or "train"
    # the scan's decode size (larger than the default for teachers with larger inputs)
    max_side = int((run.get("settings") or {}).get("decode_max_side") or DECODE_MAX_SIDE)
    if not zoo_uri:
        for s in sections:
            s.bridge_note = "run.json names no zoo, so the label-space bridge cannot be recomputed."
        return
    unreachable = None
    try:
        zoo = open_store(zoo_uri, s3_endpoint=s3_endpoint)
        if not zoo.exists(MANIFEST_FILE):
            unreachable = f"no {MANIFEST_FILE} at {zoo.uri} (moved, deleted, or not mounted here?)"
    except (StoreUnreachable, StoreAuthError, StoreError) as e:
        unreachable = str(e)
    if unreachable:
        msg = (f"The zoo {zoo_uri} was unreachable when this report was written: {unreachable}. "
               "The label-space heatmaps are left out; the scores above come from the scan.")
        notes.append(msg)
        for s in sections:
            s.bridge_note = msg
        return
    teachers: dict = {}
    for s in sections:
        if s.top_teacher is None:
            s.bridge_note = "No teacher was scored without error on this target."
            continue
        if not s.uri:
            s.bridge_note = "run.json gives no uri for this target, so its images cannot be read."
            continue
        try:
            s.bridge = load_bridge(zoo, s.top_teacher, s.name, s.uri, split, s3_endpoint, device,
                                   teacher_cache=teachers, max_side=max_side, class_names=s.classes or None)
        except SctdError as e:
            s.bridge_note = f"Cannot recompute the bridge of {s.top_teacher} on {s.name}: {e}"
            continue
        if s.classes and s.classes != s.bridge.target_classes:
            s.bridge_note = ("The target's classes differ from those recorded by the scan "
                             f"({len(s.classes)} then, {len(s.bridge.target_classes)} now): "
                             "the target changed since the scan.")


def _pick(rows: pd.DataFrame) -> dict | None:
    """The row with the highest val_acc (ties: smallest trial_id)."""
    if rows is None or not len(rows) or "val_acc" not in rows:
        return None
    acc = pd.to_numeric(rows["val_acc"], errors="coerce")
    rows = rows.assign(_acc=acc).dropna(subset=["_acc"])
    if not len(rows):
        return None
    order = ["_acc", "trial_id"] if "trial_id" in rows else ["_acc"]
    asc = [False, True] if "trial_id" in rows else [False]
    return rows.sort_values(order, ascending=asc).iloc[0].drop("_acc").to_dict()


def collect_distill(store) -> list[DistillData]:
    """Every distillation search of the run: ``RUN/distill/`` (one target), or one
    ``RUN/distill/<target>/`` per target (``sctd scan`` with several targets,
    ``distill.search.run_distill_for_scan``). Empty when the run has none."""
    try:
        keys = store.list(DISTILL_PREFIX)
    except NotFound:
        keys = []
    if not keys:
        return []
    rel = [k[len(DISTILL_PREFIX):] for k in keys]
    root = any(r in ("results.parquet", "summary.json") for r in rel)
    names = sorted({r.split("/", 1)[0] for r in rel
                    if r.endswith(("/results.parquet", "/summary.json")) and r.count("/") == 1})
    if not names:   # one target (or a distill/ folder without any search files: say so, as before)
        return [_collect_one(store, keys, DISTILL_PREFIX, None)]
    found = [_collect_one(store, keys, f"{DISTILL_PREFIX}{n}/", n) for n in names]
    if root:   # the run's first target, distilled before a --resume added others
        first = _collect_one(store, keys, DISTILL_PREFIX, None)
        first.target = str(first.summary.get("target") or "distill")
        found.insert(0, first)
    return found


def _collect_one(store, keys: list[str], prefix: str, target: str | None) -> DistillData:
    """One search's folder ``prefix`` (``distill/`` or ``distill/<target>/``)."""
    results, summary_key = prefix + "results.parquet", prefix + "summary.json"
    notes: list[str] = []
    trials = None
    if results in keys:
        try:
            trials = _read_parquet(store, results)
        except StoreError as e:
            notes.append(str(e))
    else:
        notes.append(f"{store.join(results)} is missing: no trial results to show.")
    summary = _read_json(store, summary_key, notes, "The search summary") \
        if summary_key in keys else {}
    if summary_key not in keys:
        notes.append(f"{store.join(summary_key)} is missing.")
    best = ce = None
    if trials is not None and len(trials):
        ok = trials[~trials["status"].isin(FAILED)] if "status" in trials else trials
        named = next((summary[k] for k in BEST_TRIAL_KEYS if summary.get(k) is not None), None)
        if named is not None and "trial_id" in trials:
            match = trials[trials["trial_id"].astype(str) == str(named)]
            best = match.iloc[0].to_dict() if len(match) else None
            if best is None:
                notes.append(f"summary.json names best trial {named}, which results.parquet lacks.")
        if best is None:
            best = _pick(ok)
        if "method" in ok:
            ce = _pick(ok[ok["method"] == "ce"])
    return DistillData(trials, summary, best, ce, notes, target=target)


def collect_report_data(run_uri: str, s3_endpoint: str | None = None, bridges: bool = True,
                        device: str | None = None) -> ReportData:
    """Gather a run's report data. Raises SctdError when ``run_uri`` holds no scan ranking."""
    from ..zoo.store import open_store

    store = open_store(run_uri, s3_endpoint=s3_endpoint)
    notes: list[str] = []
    try:
        ranking = _read_parquet(store, RANKING_FILE)
    except NotFound:
        raise NotFound(f"{store.join(RANKING_FILE)} not found: {store.uri} is not a finished "
                       "scan run folder (run `sctd scan` or `sctd assess --out` first)") from None
    missing = {"target", "teacher_id", "status"} - set(ranking.columns)
    if missing:
        raise StoreError(f"{store.join(RANKING_FILE)}: missing column(s) {sorted(missing)}")
    run = _read_json(store, RUN_FILE, notes, "The run description")
    if run and run.get("complete") is False:
        notes.append("The scan did not complete: teachers it did not reach are absent.")
    # the scan's own default when run.json does not say (the stored ranks come from it)
    rank_by = (run.get("settings") or {}).get("rank_by") or DEFAULT_RANK_BY
    if rank_by not in ranking.columns:
        notes.append(f"The ranking metric {rank_by!r} is not a column of ranking.parquet.")
    sections = _target_sections(ranking, run, rank_by)
    if bridges:
        _attach_bridges(sections, run, s3_endpoint, device, notes)
    else:
        for s in sections:
            s.bridge_note = "The label-space bridge was not computed for this report."
    return ReportData(run_uri=store.uri, run=run, ranking=ranking,
                      metrics=metric_columns(ranking, run), rank_by=rank_by, targets=sections,
                      distill=collect_distill(store), notes=notes,
                      generated_at=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
