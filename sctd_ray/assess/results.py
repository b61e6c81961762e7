"""Scan results: one JSON file per (teacher, target) written as soon as it is done, so an
interrupted scan resumes; ``ranking.parquet`` and ``run.json`` assembled from them."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import NotFound, SctdError
from ..score_names import DEFAULT_RANK_BY, NAMES

RESULTS_PREFIX = "results"
RANKING_FILE = "ranking.parquet"
RUN_FILE = "run.json"
BASE_COLUMNS = ["target", "teacher_id", "architecture", "status", "error"]
TAIL_COLUMNS = ["rank", "samples", "seconds", "worker"]
READ_THREADS = 16   # result files read at once: each is one small GET on S3, latency-bound


def result_key(target: str, teacher_id: str) -> str:
    return f"{RESULTS_PREFIX}/{target}/{teacher_id}.json"


def write_result(store, row: dict) -> None:
    """Atomically write one (teacher, target) result."""
    store.write_bytes(result_key(row["target"], row["teacher_id"]),
                      json.dumps(row, sort_keys=True, default=_jsonable).encode())


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def read_results(store) -> list[dict]:
    """Every result file of a run (unreadable ones are skipped: they will be rescored), read
    ``READ_THREADS`` at a time."""
    def read(key):
        try:
            return json.loads(store.read_bytes(key))
        except (NotFound, json.JSONDecodeError, UnicodeDecodeError):
            return None
    keys = [k for k in store.list(f"{RESULTS_PREFIX}/") if k.endswith(".json")]
    with ThreadPoolExecutor(max_workers=max(1, min(READ_THREADS, len(keys)))) as pool:
        return [r for r in pool.map(read, keys) if r is not None]


class RunResults:
    """A run's result rows by (target, teacher): the files already in RUN when the scan starts
    (``previous``), then each row as the driver writes it or a worker returns it (the worker
    wrote its file first). The ranking is built from these rather than by reading every file
    back, which costs one GET per pair: minutes at the end of a large scan on S3."""

    def __init__(self, store):
        self.store = store
        self.previous = read_results(store)
        self._rows = {(r["target"], r["teacher_id"]): r for r in self.previous}

    def write(self, row: dict) -> None:
        write_result(self.store, row)
        self.add(row)

    def add(self, row: dict) -> None:
        self._rows[(row["target"], row["teacher_id"])] = row

    def rows(self) -> list[dict]:
        return list(self._rows.values())


def done_pairs(rows: list[dict], metrics=()) -> set[tuple[str, str]]:
    """Pairs already scored: never scored again on --resume. An error row is not (the teacher
    may have been fixed, the failure passing: a resume tries it again), nor an ok row that
    lacks one of ``metrics`` (written by an older version, or with fewer --metrics): the pair is
    scored again and its file rewritten."""
    def complete(r):
        return r.get("status") == "ok" and all(r.get(m) is not None for m in metrics)
    return {(r["target"], r["teacher_id"]) for r in rows if complete(r)}


def ranking_table(rows: list[dict], rank_by: str = DEFAULT_RANK_BY, metrics=NAMES) -> pd.DataFrame:
    """One row per (target, teacher); rank 1 = highest ``rank_by`` within the target, equal
    scores ranked by teacher id (whatever order the rows come in); error rows come last
    without a rank."""
    extra = sorted({k for r in rows for k in r} - set(BASE_COLUMNS) - set(TAIL_COLUMNS) - set(metrics))
    cols = BASE_COLUMNS + list(metrics) + [c for c in extra if c not in ("finished_at",)] + TAIL_COLUMNS
    df = pd.DataFrame(rows).reindex(columns=cols).sort_values(["target", "teacher_id"], kind="stable")
    for m in metrics:
        df[m] = pd.to_numeric(df[m], errors="coerce")
    if rank_by not in df.columns:
        raise ValueError(f"cannot rank by {rank_by!r}: not among the computed metrics")
    ok = df["status"] == "ok"
    df["rank"] = pd.NA
    df.loc[ok, "rank"] = (df[ok].groupby("target")[rank_by]
                          .rank(ascending=False, method="first").astype("int64"))
    df["rank"] = df["rank"].astype("Int64")
    df = df.sort_values(["target", "rank", "teacher_id"], na_position="last").reset_index(drop=True)
    return df


def write_table(store, key: str, df: pd.DataFrame) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
    store.write_bytes(key, buf.getvalue())


def read_table(store, key: str, columns=()) -> pd.DataFrame:
    """A Parquet file of the run as a DataFrame; one SctdError line when it is not one, or
    lacks one of ``columns``."""
    try:
        df = pq.read_table(io.BytesIO(store.read_bytes(key))).to_pandas()
    except (pa.ArrowInvalid, OSError) as e:
        raise SctdError(f"{store.join(key)}: not a readable Parquet file ({e})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SctdError(f"{store.join(key)} lacks column(s) {missing}")
    return df


def format_ranking(df: pd.DataFrame, top: int = 10, metrics=("sctd", "sctd_fused", "sctd_cost", "leep", "nce", "logme")) -> str:
    """Per target: the top teachers, then every error row."""
    out = []
    for target, g in df.groupby("target", sort=True):
        ok, bad = g[g.status == "ok"], g[g.status != "ok"]
        cols = ["rank", "teacher_id", "architecture"] + [m for m in metrics if m in g.columns]
        out.append(f"== {target}: {len(ok)} teachers scored, {len(bad)} errors")
        if len(ok):
            out.append(ok[cols].head(top).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        for _, r in bad.iterrows():
            out.append(f"   error  {r['teacher_id']}: {r['error']}")
    return "\n".join(out)
