"""Target splits as Ray Datasets: read and decode once (Ray Data), materialise, and hand the
blocks to every shard worker (RAY-NOTES: each actor reads all of a materialised dataset).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import TargetError
from .images import DECODE_MAX_SIDE, decode_image, decode_size, decode_with_side, unify_channels
from .targets import (check_enough_classes, check_known_labels, check_labels_present, detect_layout,
                      image_digest, image_folder_files, parquet_split, target_fingerprint, target_name)


def arrow_filesystem(uri: str, s3_endpoint: str | None = None):
    """(pyarrow filesystem, path without scheme) for a local path or s3:// uri."""
    import pyarrow.fs as pafs

    if not uri.startswith("s3://"):
        return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {"region": os.environ.get("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION", "us-east-1")),
              "connect_timeout": 3, "request_timeout": 30}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kwargs), uri.removeprefix("s3://")


class DecodeBatch:
    """map_batches fn: PNG/JPEG bytes -> uint8 images of one size (``images.decode_image``);
    labels stay class names (ids are assigned once the split's classes are known). An image that
    does not decode becomes zeros plus its reason in the ``error`` column (empty when fine), so
    the driver reports every bad image in one line instead of a failed Ray task.

    ``channels=3`` decodes every image as RGB; ``channels=1`` (the split's first image is grey)
    keeps each image's own kind, a batch with a colour image in it is RGB, and the ``colour``
    column tells the driver that the split needs ``grey_to_rgb``."""

    def __init__(self, where: str, size: tuple[int, int], channels: int):
        self.where, self.size, self.channels = where, tuple(size), channels

    def __call__(self, batch: dict) -> dict:
        labels = [v.decode() if isinstance(v, bytes) else None if v is None else str(v)
                  for v in batch["label"]]
        sources = batch.get("source")
        forced = 3 if self.channels == 3 else None
        images, errors, sides = [], [], []
        for i, (data, label) in enumerate(zip(batch["image"], labels)):
            where = sources[i] if sources is not None else f"{self.where} (label {label!r})"
            try:
                image, side = decode_with_side(data, self.size, where=where, channels=forced)
                images.append(image)
                sides.append(side)
                errors.append("")
            except TargetError as e:
                images.append(np.zeros((*self.size, self.channels), np.uint8))
                sides.append(0)
                errors.append(str(e))
        colour = np.array([im.shape[2] == 3 for im in images], dtype=bool)
        digest = [image_digest(d) for d in batch["image"]]
        side = np.array(sides, np.int64)
        return {"image": np.stack(unify_channels(images)), "label": np.asarray(labels, dtype=object),
                "error": np.asarray(errors, dtype=object), "colour": colour,
                "digest": np.asarray(digest, dtype=object), "side": side}


def grey_to_rgb(batch: dict) -> dict:
    """map_batches fn for a split of grey and colour images: every image RGB. (Ray Data joins
    batches of 1 and 3 channels into one block of variable-shaped images, an object array.)"""
    images = batch["image"]
    if images.dtype == object or images.shape[-1] == 1:
        batch["image"] = np.stack([np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im for im in images])
    return batch


@dataclass
class MaterializedTarget:
    """A decoded target split held in Ray's object store, shared by every worker."""

    name: str
    uri: str
    class_names: list[str]
    num_rows: int
    block_refs: list  # ObjectRefs of {"image": uint8 (n,H,W,C), "label": class names (n,)}
    fingerprint: str = ""   # ``target_fingerprint``: which images and labels these are
    note: str = ""          # a line for the user (``size_note``): most images lose detail

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _may_lack_labels(pf) -> bool:
    """Whether the footer's statistics count a null label, or have a smallest label that is
    empty or starts with a space or control character (a blank label sorts first). Splits
    written without statistics are checked as they are decoded (``materialize_target``)."""
    col = pf.schema_arrow.get_field_index("label")
    for i in range(pf.metadata.num_row_groups):
        stats = pf.metadata.row_group(i).column(col).statistics
        if stats is None:
            continue
        if stats.has_null_count and stats.null_count > 0:
            return True
        least = stats.min if stats.has_min_max else None
        if isinstance(least, bytes):
            least = least.decode("utf-8", "replace")
        if isinstance(least, str) and (not least or least[0] <= " "):
            return True
    return False


def _first_image(store, split: str, pf=None, files=None) -> bytes:
    """The first image of a split, read directly (to fix the split's size and channels); of a
    Parquet split (``pf``, opened by ranges) only the footer and the first data page are read,
    of an ImageFolder split the first of its ``files``."""
    if pf is not None:
        if pf.metadata.num_rows == 0:
            raise TargetError(f"{store.join(split + '.parquet')}: split {split!r} is empty")
        return next(pf.iter_batches(batch_size=1, columns=["image"])).column("image")[0].as_py()
    return store.read_bytes(files[0][0])


def _records_dataset(probe: "TargetProbe", s3_endpoint: str | None):
    """Undecoded Ray Dataset with columns image (bytes) and label (class name)."""
    import pyarrow.fs as pafs
    import ray.data

    fs, root = arrow_filesystem(probe.uri, s3_endpoint)
    if probe.layout == "parquet":
        # the target folder as the filesystem's root: read_parquet takes a '?' in a path for a
        # URL query and drops a tab (a target folder "what?" was "no files found", a traceback)
        fs = pafs.SubTreeFileSystem(root, fs)
        return ray.data.read_parquet(f"{probe.split}.parquet", filesystem=fs).select_columns(["image", "label"])
    ds = ray.data.read_binary_files([f"{root}/{k}" for k, _ in probe.files], filesystem=fs, include_paths=True)
    prefix = probe.uri.rstrip("/")
    return ds.map(lambda r: {"image": r["bytes"], "label": r["path"].rsplit("/", 2)[-2],
                             "source": prefix + "/" + "/".join(r["path"].rsplit("/", 3)[-3:])})


@dataclass
class TargetProbe:
    """A target split as far as it can be checked without Ray (``probe_target``)."""

    uri: str
    split: str
    store: object
    layout: str                      # "parquet" or "imagefolder" (``targets.detect_layout``)
    shape: tuple[int, int, int]      # (H, W) every image is decoded to (``images.decode_size``),
                                     # and C of its first image (3 in the end if any is in colour)
    files: list | None = None        # an ImageFolder split's (key, class name): listed once
    max_side: int = DECODE_MAX_SIDE  # the cap on the decoded side (``images.decode_size``)

    @property
    def where(self) -> str:
        return _where(self.uri, self.split)


def _where(uri: str, split: str) -> str:
    return f"{uri.rstrip('/')} split {split!r}"


def probe_target(uri: str, split: str = "train", s3_endpoint: str | None = None,
                 max_side: int = DECODE_MAX_SIDE) -> TargetProbe:
    """The target's layout and its split's first image, read directly: a missing, empty or
    malformed target (or an unreachable store) fails here, in about a second, before any Ray
    work starts. ``max_side``: no image is decoded larger (``images.decode_size``)."""
    from ..zoo.store import open_store

    store = open_store(uri, s3_endpoint=s3_endpoint)
    layout = detect_layout(store)
    pf = parquet_split(store, split, whole=False) if layout == "parquet" else None
    if pf is not None and _may_lack_labels(pf):
        check_labels_present(parquet_split(store, split).read(columns=["label"]).column("label"),
                             store.join(f"{split}.parquet"))
    files = image_folder_files(store, split) if layout == "imagefolder" else None
    if files is not None and split == "train":   # the folder listing names the classes
        check_enough_classes(_where(uri, split), {label for _, label in files})
    first = decode_image(_first_image(store, split, pf, files),
                         where=store.join(files[0][0]) if files is not None else f"{_where(uri, split)} row 0")
    return TargetProbe(uri, split, store, layout, (*decode_size(first.shape[:2], max_side), first.shape[2]),
                       files, max_side)


def materialize_target(uri: str, split: str = "train", s3_endpoint: str | None = None,
                       class_names: list[str] | None = None,
                       probe: TargetProbe | None = None) -> MaterializedTarget:
    """Read + decode one split with Ray Data (one pass), validate it, and keep its blocks in
    the object store. Class names default to the sorted labels of this split (the train split
    defines a task's classes); with ``class_names`` given, other labels are an error. ``probe``:
    the split's ``probe_target``, when the caller checked it already (it fixes the decoded size)."""
    import ray

    probe = probe or probe_target(uri, split, s3_endpoint)
    store, layout, where = probe.store, probe.layout, probe.where
    ds = _records_dataset(probe, s3_endpoint)
    decoded = ds.map_batches(DecodeBatch(where, probe.shape[:2], probe.shape[2]),
                             batch_size=256, batch_format="numpy").materialize()
    meta = ray.get(decoded.select_columns(["label", "error", "colour", "digest", "side"]).to_numpy_refs())
    errors = [e for b in meta for e in b["error"] if e]
    if errors:
        first = _first_undecodable(store, split) if layout == "parquet" else errors[0]
        raise TargetError(f"{len(errors)} undecodable image(s) in {where}; the first: {first or errors[0]}")
    if probe.shape[2] == 1 and any(b["colour"].any() for b in meta):  # grey first, colour later
        decoded = decoded.map_batches(grey_to_rgb, batch_format="numpy").materialize()
    refs = decoded.to_numpy_refs()   # each ref is a Ray *task* (block -> ndarray), still pending
    # wait for those tasks here: the shard actors created next take every CPU (one per CPU by
    # default) and would wait in ray.get for tasks that can no longer be scheduled (a deadlock)
    ray.wait(refs, num_returns=len(refs), fetch_local=False)
    labels = np.concatenate([b["label"] for b in meta])
    if any(label is None or not str(label).strip() for label in labels):
        if layout == "parquet":   # the row numbers: Ray Data does not keep them
            check_labels_present(parquet_split(store, split).read(columns=["label"]).column("label"),
                                 store.join(f"{split}.parquet"))
        raise TargetError(f"{where}: a class folder without a name")
    found = sorted(set(labels.tolist()))
    if class_names is None:
        class_names = found
        check_enough_classes(where, class_names)
    check_known_labels(uri, split, found, class_names)
    digests = np.concatenate([b["digest"] for b in meta])
    return MaterializedTarget(target_name(uri), store.uri, list(class_names), int(len(labels)), refs,
                              target_fingerprint(digests, labels),
                              size_note(probe, np.concatenate([b["side"] for b in meta])))


def size_note(probe: TargetProbe, sides: np.ndarray) -> str:
    """A line when most of a split's images are at least twice the size it is decoded to, which
    its first image fixed (a thumbnail sorted first: a folder of photos scored at 8 px), not the
    cap ``max_side`` (photos decoded at 512 px as meant)."""
    side = probe.shape[0]
    larger = int((np.minimum(sides, probe.max_side) >= 2 * side).sum())   # none beyond the cap
    if larger * 2 <= len(sides):
        return ""
    first = probe.store.join(probe.files[0][0]) if probe.files is not None else "its row 0"
    return (f"{probe.where}: decoded at {side}x{side} px, the size of its first image ({first}); "
            f"{larger} of {len(sides)} images are at least twice as large (up to {int(sides.max())} px) "
            "and are scored with that detail lost: make the first image (in name order) a typical one")


def _first_undecodable(store, split: str) -> str | None:
    """The row number and reason of a Parquet split's first undecodable image (the error path
    only: Ray Data does not keep row numbers)."""
    row = 0
    for batch in parquet_split(store, split, whole=False).iter_batches(batch_size=64, columns=["image"]):
        for data in batch.column("image").to_pylist():
            try:
                decode_image(data, where=f"{_where(store.uri, split)} row {row}")
            except TargetError as e:
                return str(e)
            row += 1
    return None


def target_blocks(target: MaterializedTarget) -> tuple[list[np.ndarray], np.ndarray]:
    """All rows of a materialised target, not copied: its uint8 image blocks (n_i, H, W, C) as
    they lie in Ray's object store (read-only views, shared by every worker of a node), and the
    int64 class ids of all rows, in order."""
    import ray

    blocks = [b for b in ray.get(list(target.block_refs)) if len(b["label"])]
    index = {c: i for i, c in enumerate(target.class_names)}
    labels = np.fromiter((index[v] for b in blocks for v in b["label"]), dtype=np.int64)
    return [b["image"] for b in blocks], labels
