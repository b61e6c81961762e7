"""The zoo manifest: one row per teacher, built from each config.json and only the header of
each model.safetensors (no weight download), stored as ``<zoo>/manifest.parquet``.
"""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import NotFound, SctdError, StoreAuthError, StoreUnreachable, TeacherError, ZooError
from .teacher import (CONFIG_FILE, TEACHERS_PREFIX, WEIGHTS_FILE, TeacherConfig, check_teacher_id,
                      parse_safetensors_header, read_config_bytes, weights_key)

MANIFEST_FILE = "manifest.parquet"
OPTIONAL_COLUMNS = ("config_sha256",)   # absent from manifests written before 0.1.1: None
COLUMNS = ["id", "architecture", "num_classes", "num_features", "label_names", "input_size",
           "params", "bytes", "sha256", "uri", "source_task", "status", "error", "config_sha256"]


def list_teacher_ids(store) -> list[str]:
    """Ids of every ``teachers/<id>/`` folder in the zoo, sorted."""
    return sorted(_teacher_times(store))


def _teacher_times(store, listing: dict[str, float] | None = None) -> dict[str, float]:
    """Every ``teachers/<id>/`` folder's id and the newest modification time of its files, from
    one listing (``store.modified``'s, when given). Hidden folders are left out."""
    times: dict[str, float] = {}
    if listing is None:
        listing = store.modified(f"{TEACHERS_PREFIX}/")
    for key, when in listing.items():
        parts = key.split("/")
        # a hidden folder (.ipynb_checkpoints, .DS_Store's kin) is no teacher, as in targets
        if len(parts) >= 3 and parts[1] and not parts[1].startswith("."):
            times[parts[1]] = max(when, times.get(parts[1], when))
    return times


def weights_sha256(store, key: str) -> str | None:
    """The sha256 of a weights file where it is cheap: an S3 object's metadata, a local file
    hashed; None for an S3 object without the metadata (no download for it)."""
    info = store.info(key)
    if info.get("sha256"):
        return info["sha256"]
    from .store import LocalStore, sha256_file

    if isinstance(store, LocalStore):  # a local read is not a download
        return sha256_file(store.path(key))
    return None


def describe_teacher(store, teacher_id: str) -> dict:
    """One manifest row. A broken teacher gives a row with status='error' and the reason."""
    row = {c: None for c in COLUMNS}
    row.update(id=teacher_id, uri=store.join(f"{TEACHERS_PREFIX}/{teacher_id}"), status="ok", error="")
    try:
        check_teacher_id(teacher_id)
        raw = read_config_bytes(store, teacher_id)
        row.update(config_sha256=hashlib.sha256(raw).hexdigest())
        cfg = TeacherConfig.from_json(teacher_id, raw)
        key = weights_key(teacher_id)
        try:
            size = store.size(key)
        except NotFound:
            raise TeacherError(teacher_id, "model.safetensors is missing") from None
        header = parse_safetensors_header(teacher_id, lambda s, n: store.read_range(key, s, n))
        if header["file_bytes"] != size:   # cut short (an interrupted copy), or run on
            raise TeacherError(teacher_id, f"model.safetensors is truncated or corrupt: {size} bytes, "
                               f"its header describes {header['file_bytes']}")
        row.update(architecture=cfg.architecture, num_classes=cfg.num_classes,
                   num_features=cfg.num_features, label_names=list(cfg.label_names),
                   input_size=[int(v) for v in cfg.pretrained_cfg["input_size"]],
                   params=header["params"], bytes=size, sha256=weights_sha256(store, key),
                   source_task=json.dumps(cfg.source_task, sort_keys=True))
    except (StoreUnreachable, StoreAuthError):
        raise
    except SctdError as e:
        row.update(status="error", error=str(e))
    return row


def build_manifest(store, workers: int = 8) -> pd.DataFrame:
    """Describe every teacher of the zoo (in parallel: S3 latency dominates)."""
    ids = list_teacher_ids(store)
    if not ids:
        raise ZooError(f"{store.uri}: no teachers found (expected teachers/<id>/config.json)")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(lambda t: describe_teacher(store, t), ids))
    return pd.DataFrame(rows, columns=COLUMNS)


def current_manifest(store, log=print, workers: int = 8) -> pd.DataFrame:
    """The manifest as the zoo is now: ``manifest.parquet`` (built on the fly when the zoo has
    none), with teachers whose files were written after it (retrained in place, added) described
    again and teachers whose files are gone left out. One listing of ``teachers/`` with its
    modification times decides; ``sctd zoo index``, ``zoo push`` and ``zoo pull`` write the
    manifest after the files it describes."""
    try:
        written = store.info(MANIFEST_FILE).get("mtime")
    except NotFound:
        return build_manifest(store, workers)
    manifest = read_manifest(store)
    if written is None:
        return manifest
    listing = store.modified(f"{TEACHERS_PREFIX}/")
    times = _teacher_times(store, listing)
    present, listed = set(times), set(manifest["id"])
    # a deleted file leaves no newer time behind: an "ok" teacher that lacks one now is read again
    lost = {t for t in set(manifest.loc[manifest["status"] == "ok", "id"]) & present
            if any(f"{TEACHERS_PREFIX}/{t}/{name}" not in listing for name in (CONFIG_FILE, WEIGHTS_FILE))}
    changed = sorted({t for t, when in times.items() if when > written} | (present - listed) | lost)
    gone = sorted(listed - present)
    if not changed and not gone:
        return manifest
    with ThreadPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(lambda t: describe_teacher(store, t), changed))
    keep = manifest[~manifest["id"].isin(changed) & ~manifest["id"].isin(gone)]
    fresh = pd.DataFrame(rows, columns=COLUMNS)
    manifest = (pd.concat([keep, fresh], ignore_index=True) if len(keep) else fresh)
    manifest = manifest.sort_values("id", ignore_index=True)
    if manifest.empty:
        raise ZooError(f"{store.uri}: no teachers found (expected teachers/<id>/config.json)")

    def some(ids):
        return ", ".join(ids[:5]) + (" ..." if len(ids) > 5 else "")

    log(f"zoo: {MANIFEST_FILE} is older than the zoo: "
        + "; ".join(part for part in (
            f"{len(changed)} teacher(s) changed or added since, read again ({some(changed)})" if changed else "",
            f"{len(gone)} listed but gone, left out ({some(gone)})" if gone else "") if part)
        + f"; `sctd zoo index {store.uri}` brings it up to date")
    return manifest


def write_manifest(store, df: pd.DataFrame) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
    store.write_bytes(MANIFEST_FILE, buf.getvalue())


def read_manifest(store, build_if_missing: bool = True) -> pd.DataFrame:
    """The zoo's manifest; built on the fly (not written) when the zoo has none."""
    try:
        data = store.read_bytes(MANIFEST_FILE)
    except NotFound:
        if not build_if_missing:
            raise ZooError(f"{store.uri}: no {MANIFEST_FILE}; run `sctd zoo index {store.uri}`") from None
        return build_manifest(store)
    try:
        df = pq.read_table(io.BytesIO(data)).to_pandas()
    except (pa.ArrowInvalid, OSError) as e:
        raise ZooError(f"{store.join(MANIFEST_FILE)} is not a valid Parquet file: {e}; "
                       f"`sctd zoo index {store.uri}` writes it again") from None
    missing = [c for c in COLUMNS if c not in df.columns and c not in OPTIONAL_COLUMNS]
    if missing:
        raise ZooError(f"{store.join(MANIFEST_FILE)} lacks column(s) {missing}: it is not a manifest "
                       f"this version reads; `sctd zoo index {store.uri}` writes it again")
    for c in OPTIONAL_COLUMNS:
        if c not in df.columns:
            df[c] = None
    # where each teacher is in the zoo read, not in the one indexed (a pushed or pulled copy)
    df["uri"] = [store.join(f"{TEACHERS_PREFIX}/{t}") for t in df["id"]]
    return df
