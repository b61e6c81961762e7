"""Copy every key of one store to another, skipping files that are already there unchanged.

    sync("./zoo", "s3://bucket/zoo")      # local -> S3; also S3 -> local, local -> local, S3 -> S3

A key is skipped when the destination has the same size and provably the same content:
equal sha256 (computed for local files, read from the `sha256` metadata this package
writes on every S3 object), else, for an S3 object without it, equal single-part ETag
(an MD5). When in doubt the file is copied. Nothing is ever deleted from the destination.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from sctd_ray.errors import NotFound, ZooError
from sctd_ray.zoo.manifest import MANIFEST_FILE, current_manifest, write_manifest
from sctd_ray.zoo.store import LocalStore, Store, md5_file, open_store, sha256_file

SYNC_THREADS = 4


@dataclass(frozen=True)
class SyncResult:
    copied: int  # keys written to the destination
    skipped: int  # keys already there, unchanged
    bytes: int  # bytes copied


def _fingerprint(store: Store, key: str) -> dict:
    """size, plus sha256 when cheaply known (local: hashed; S3: metadata) and etag (S3)."""
    info = dict(store.info(key))
    if isinstance(store, LocalStore):
        info["sha256"] = sha256_file(store.path(key))
    return info


def _md5_etag(info: dict) -> str | None:
    etag = info.get("etag")
    return etag if etag and "-" not in etag and len(etag) == 32 else None


def unchanged(src: Store, dst: Store, key: str) -> tuple[bool, dict]:
    """Whether dst already holds key with src's content; also src's fingerprint."""
    s = _fingerprint(src, key)
    try:
        d = _fingerprint(dst, key)
    except NotFound:
        return False, s
    if s["size"] != d["size"]:
        return False, s
    if s.get("sha256") and d.get("sha256"):
        return s["sha256"] == d["sha256"], s
    # an S3 object not written by us: compare its MD5 ETag (single-part uploads only)
    etag_s, etag_d = _md5_etag(s), _md5_etag(d)
    if etag_s and etag_d:
        return etag_s == etag_d, s
    if isinstance(src, LocalStore) and etag_d:
        return md5_file(src.path(key)) == etag_d, s
    if isinstance(dst, LocalStore) and etag_s:
        return md5_file(dst.path(key)) == etag_s, s
    return False, s


def _copy(src: Store, dst: Store, key: str, sha256: str | None, callback) -> None:
    if isinstance(dst, LocalStore):
        src.download(key, dst.path(key), callback=callback)
    elif isinstance(src, LocalStore):
        dst.upload(src.path(key), key, callback=callback, sha256=sha256)
    else:  # S3 -> S3, possibly across endpoints or credentials: through a local temp file
        fd, name = tempfile.mkstemp(prefix="sctd-sync-")
        os.close(fd)
        try:
            src.download(key, name)
            dst.upload(name, key, callback=callback, sha256=sha256)
        finally:
            Path(name).unlink(missing_ok=True)


def _brought_up_to_date(src: Store):
    """The source zoo's manifest as ``current_manifest`` reads it, when teacher files were
    written after it or are gone since (else None: it is copied as it is). A copy of the stale
    file would be written after the teacher files it does not describe, and so look current at
    the destination: its old rows used, a retrained teacher's weights refused."""
    stale = []
    try:
        manifest = current_manifest(src, log=stale.append)
    except ZooError:     # unreadable, or no teachers left: copied as it is, as before
        return None
    return manifest if stale else None


def sync(src_uri: str, dst_uri: str, s3_endpoint: str | None = None,
         progress: bool = True, threads: int = SYNC_THREADS, log=print) -> SyncResult:
    """Copy all keys of `src_uri` to `dst_uri` (both local paths or s3:// urls)."""
    src, dst = open_store(src_uri, s3_endpoint), open_store(dst_uri, s3_endpoint)
    keys = src.list()
    # a local source is sized up front (cheap stats); an S3 one would need a HEAD per key
    total = None
    if isinstance(src, LocalStore):
        sizes = {}
        for k in keys:
            try:
                sizes[k] = src.size(k)
            except NotFound:   # a link to nothing (an unmounted disk), or removed while listed
                pass
        broken = [k for k in keys if k not in sizes]
        if broken:
            log(f"sync: {len(broken)} file(s) left out, links to nothing or removed while listed: "
                f"{', '.join(broken[:5])}{' ...' if len(broken) > 5 else ''}")
        keys, total = list(sizes), sum(sizes.values())
    if not keys:
        raise NotFound(f"nothing to sync: no files under {src.uri}")

    lock = threading.Lock()
    counts = {"copied": 0, "skipped": 0, "bytes": 0}
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
               desc=f"sync -> {dst.uri}",
               disable=not progress or not sys.stderr.isatty())

    def advance(n: int) -> None:
        with lock:
            bar.update(n)

    def one(key: str) -> None:
        same, fp = unchanged(src, dst, key)
        if same:
            with lock:
                counts["skipped"] += 1
            advance(fp["size"])
            return
        _copy(src, dst, key, fp.get("sha256"), advance)
        with lock:
            counts["copied"] += 1
            counts["bytes"] += fp["size"]

    # a zoo's manifest goes last: a scan takes teacher files newer than it for changes made
    # after `sctd zoo index` (manifest.current_manifest)
    last = [k for k in keys if k == MANIFEST_FILE]
    try:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            futures = [pool.submit(one, key) for key in keys if key != MANIFEST_FILE]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for future in pending:
                future.cancel()
            for future in done:
                future.result()  # re-raises the first failure
        for key in last:
            fresh = _brought_up_to_date(src)
            if fresh is None:
                one(key)
                continue
            write_manifest(dst, fresh)
            counts["copied"] += 1
            log(f"sync: {src.join(MANIFEST_FILE)} is older than the teacher files it describes: "
                f"{dst.join(MANIFEST_FILE)} is written up to date instead (`sctd zoo index "
                f"{src.uri}` updates the source's)")
    finally:
        bar.close()
    return SyncResult(**counts)
