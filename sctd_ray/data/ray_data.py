"""Target splits as Ray Datasets: read and decode once (Ray Data), materialise, and hand the
blocks to every shard worker (RAY-NOTES: each actor reads all of a materialised dataset).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import TargetError
from .images import decode_image
from .targets import IMAGE_SUFFIXES, detect_layout, target_name


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
    """map_batches fn: PNG/JPEG bytes + class names -> uint8 images + integer labels."""

    def __init__(self, where: str, class_names: list[str], size: tuple[int, int], channels: int):
        self.where, self.size, self.channels = where, tuple(size), channels
        self.index = {c: i for i, c in enumerate(class_names)}

    def __call__(self, batch: dict) -> dict:
        images, labels = [], []
        for i, (data, label) in enumerate(zip(batch["image"], batch["label"])):
            label = label.decode() if isinstance(label, bytes) else str(label)
            if label not in self.index:
                raise TargetError(f"{self.where}: label {label!r} is not a class of the train split")
            img = decode_image(data, self.size, where=f"{self.where} ({label!r}, batch row {i})",
                               channels=self.channels)
            images.append(img)
            labels.append(self.index[label])
        return {"image": np.stack(images), "label": np.asarray(labels, dtype=np.int64)}


@dataclass
class MaterializedTarget:
    """A decoded target split held in Ray's object store, shared by every worker."""

    name: str
    uri: str
    class_names: list[str]
    num_rows: int
    block_refs: list  # ObjectRefs of {"image": uint8 (n,H,W,C), "label": int64 (n,)}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _records_dataset(uri: str, split: str, s3_endpoint: str | None):
    """Undecoded Ray Dataset with columns image (bytes) and label (str)."""
    import ray.data

    from ..zoo.store import open_store

    store = open_store(uri, s3_endpoint=s3_endpoint)
    layout = detect_layout(store)
    fs, root = arrow_filesystem(uri, s3_endpoint)
    if layout == "parquet":
        if not store.exists(f"{split}.parquet"):
            raise TargetError(f"{store.join(split + '.parquet')}: missing split {split!r}")
        return ray.data.read_parquet(f"{root}/{split}.parquet", filesystem=fs, columns=["image", "label"])
    keys = [k for k in store.list(f"{split}/") if k.lower().endswith(IMAGE_SUFFIXES)]
    if not keys:
        raise TargetError(f"{store.join(split)}: missing or empty split {split!r}")
    ds = ray.data.read_binary_files([f"{root}/{k}" for k in keys], filesystem=fs, include_paths=True)
    return ds.map(lambda r: {"image": r["bytes"], "label": r["path"].rsplit("/", 2)[-2]})


def materialize_target(uri: str, split: str = "train", s3_endpoint: str | None = None,
                       class_names: list[str] | None = None) -> MaterializedTarget:
    """Read + decode one split with Ray Data, validate it, and keep its blocks in the object store.

    Class names default to the sorted labels of this split (the train split defines them).
    """
    where = f"{uri.rstrip('/')} split {split!r}"
    ds = _records_dataset(uri, split, s3_endpoint)
    first = ds.take(1)
    if not first:
        raise TargetError(f"{where}: the split is empty")
    probe = decode_image(first[0]["image"], where=f"{where} row 0")
    if class_names is None:
        class_names = sorted(str(v.decode() if isinstance(v, bytes) else v) for v in ds.unique("label"))
        if len(class_names) < 2:
            raise TargetError(f"{where}: {len(class_names)} class(es); a target needs at least 2")
    decoded = ds.map_batches(DecodeBatch(where, class_names, probe.shape[:2], probe.shape[2]),
                             batch_size=256, batch_format="numpy").materialize()
    refs = decoded.to_numpy_refs()
    num_rows = decoded.count()
    return MaterializedTarget(target_name(uri), uri, list(class_names), num_rows, refs)


def gather(target: MaterializedTarget) -> tuple[np.ndarray, np.ndarray]:
    """All rows of a materialised target as (images, labels) numpy arrays (zero-copy blocks)."""
    import ray

    blocks = [b for b in ray.get(list(target.block_refs)) if len(b["label"])]
    return (np.concatenate([b["image"] for b in blocks]), np.concatenate([b["label"] for b in blocks]))
