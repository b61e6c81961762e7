"""Target tasks: few-shot labelled images with class names, split into train/val/test.

Two layouts, local or on S3 (any store):
- Parquet: ``<target>/{train,val,test}.parquet`` with columns ``image`` (PNG/JPEG bytes) and
  ``label`` (class name).
- ImageFolder: ``<target>/<split>/<class name>/<image file>``.

Class ids are the sorted class names of the ``train`` split; val/test may only use those.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import NotFound, TargetError
from .images import DECODE_MAX_SIDE, decode_image, decode_size, encode_png, unify_channels

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass
class TargetSplit:
    """Decoded images (N, H, W, C) uint8 and integer labels into the task's class names."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TargetTask:
    name: str
    uri: str
    class_names: list[str]
    splits: dict[str, TargetSplit] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)   # split -> ``target_fingerprint``

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def target_name(uri: str) -> str:
    """A target's name: its folder's last part (of the absolute path: ``.`` names the folder)."""
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    return uri.rstrip("/").rsplit("/", 1)[-1]


def image_digest(data) -> str:
    """The digest of one image's stored bytes, as ``target_fingerprint`` takes it."""
    return hashlib.blake2b(bytes(data or b""), digest_size=16).hexdigest()


def target_fingerprint(digests, labels) -> str:
    """What a target split's scores depend on: its (image bytes, label) pairs, in any order. A
    resumed scan scores a pair again when its target's fingerprint changed (a new target under
    the same name, images added or relabelled), and a student distilled on a split is not
    scored on it under another name (the fingerprint is in its card)."""
    lines = sorted(f"{d} {label}" for d, label in zip(digests, labels))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32]


def _open(uri: str, s3_endpoint: str | None):
    from ..zoo.store import open_store

    return open_store(uri, s3_endpoint=s3_endpoint)


def detect_layout(store) -> str:
    keys = store.list()
    if any(k in keys for k in (f"{s}.parquet" for s in SPLITS)):
        return "parquet"
    if any(k.startswith("train/") for k in keys):
        return "imagefolder"
    raise TargetError(f"{store.uri}: not a target task (expected train.parquet/val.parquet/"
                      "test.parquet, or train/<class>/<image> folders)")


class _StoredFile(io.RawIOBase):
    """One stored object as a read-only, seekable file that reads byte ranges (local or S3):
    a Parquet footer and a row group without fetching the whole file."""

    def __init__(self, store, key: str):
        self.store, self.key = store, key
        self.length, self.pos = store.size(key), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.length - self.pos)
        if n <= 0:   # at or past the end: no request (an S3 read of 0 bytes is still a HEAD)
            return 0
        data = self.store.read_range(self.key, self.pos, n)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


def parquet_split(store, split: str, whole: bool = True) -> pq.ParquetFile:
    """``<split>.parquet`` opened and checked: it exists, is Parquet, has image and label.
    ``whole=False`` reads it by ranges as it is used (a probe of its first rows reads the footer
    and the first data page, not the whole split)."""
    key = f"{split}.parquet"
    try:
        data = io.BytesIO(store.read_bytes(key)) if whole else _StoredFile(store, key)
    except NotFound:
        raise TargetError(f"{store.join(key)}: missing split {split!r}") from None
    try:
        # by ranges: each of Arrow's reads is one request, and a column chunk is read as it is
        # decoded (64 KiB at a time, up to the page that holds the rows asked for)
        pf = pq.ParquetFile(data) if whole else pq.ParquetFile(data, buffer_size=1 << 16, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as e:
        raise TargetError(f"{store.join(key)}: not a Parquet file ({e})") from None
    missing = {"image", "label"} - set(pf.schema_arrow.names)
    if missing:
        raise TargetError(f"{store.join(key)}: missing column(s) {sorted(missing)}; found "
                          f"{pf.schema_arrow.names} (a target split needs image: PNG/JPEG bytes "
                          f"and label: class name)")
    schema = pf.schema_arrow
    label, image = schema.field("label").type, schema.field("image").type
    if pa.types.is_dictionary(label):
        label = label.value_type
    if not (pa.types.is_string(label) or pa.types.is_large_string(label) or pa.types.is_string_view(label)
            or pa.types.is_integer(label)):
        raise TargetError(f"{store.join(key)}: 'label' must hold class names (strings), not {label}")
    if not (pa.types.is_binary(image) or pa.types.is_large_binary(image) or pa.types.is_binary_view(image)):
        raise TargetError(f"{store.join(key)}: 'image' must hold image bytes (PNG/JPEG...), not {image}")
    return pf


def check_labels_present(labels: pa.ChunkedArray | pa.Array, where: str) -> None:
    """A null or empty label is an error naming its row, not a class called "None" or ""."""
    import pyarrow.compute as pc

    try:
        labels = labels.cast(pa.string()) if not pa.types.is_string(labels.type) else labels
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise TargetError(f"{where}: 'label' must hold class names (strings), not {labels.type}") from None
    missing = pc.or_kleene(pc.is_null(labels), pc.equal(pc.utf8_trim_whitespace(labels), ""))
    missing = pc.fill_null(missing, True)
    n = pc.sum(missing).as_py() or 0
    if n:
        first = pc.index(missing, True).as_py()
        raise TargetError(f"{where}: {n} row(s) without a label; the first is row {first}")


def image_folder_files(store, split: str) -> list[tuple[str, str]]:
    """(key, class name) of each image of an ImageFolder split, ``<split>/<class>/<image>``, in
    the store's order. Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints/``, macOS's
    ``._`` files) and files without an image suffix (``README.txt``) are not part of it; an
    image anywhere else (a nested folder, loose in the split) is an error naming it."""
    files = []
    for k in store.list(f"{split}/"):
        parts = k.split("/")
        if any(p.startswith(".") for p in parts) or not k.lower().endswith(IMAGE_SUFFIXES):
            continue
        if len(parts) != 3:
            raise TargetError(f"{store.join(k)}: expected {split}/<class>/<image> (images in a "
                              f"class folder, no deeper)")
        files.append((k, parts[1]))
    if not files:
        raise TargetError(f"{store.join(split)}: missing or empty split {split!r}")
    return files


def check_enough_classes(where: str, classes) -> None:
    """A task needs at least 2 classes (its train split's)."""
    if len(classes) < 2:
        raise TargetError(f"{where}: {len(classes)} class(es); need at least 2")


def split_labels(store, split: str, layout: str) -> list[str]:
    """The class names of a split's rows, without reading its images (a folder listing, or the
    Parquet label column)."""
    if layout == "imagefolder":
        return [label for _, label in image_folder_files(store, split)]
    column = parquet_split(store, split, whole=False).read(columns=["label"]).column("label")
    check_labels_present(column, store.join(f"{split}.parquet"))
    return [str(x) for x in column.to_pylist()]


def check_split_labels(uri: str, splits=SPLITS, s3_endpoint: str | None = None) -> None:
    """What a scan's distillation will need of a target, checked from its labels alone, before
    any Ray work: every split present and not empty, at least 2 train classes, and no other
    split using a class the train split lacks. Raises TargetError."""
    store = _open(uri, s3_endpoint)
    layout = detect_layout(store)
    classes = sorted(set(split_labels(store, "train", layout)))
    check_enough_classes(f"{uri} split 'train'", classes)
    for split in splits:
        if split != "train":
            labels = split_labels(store, split, layout)
            if not labels:
                raise TargetError(f"{uri}: split {split!r} is empty")
            check_known_labels(uri, split, labels, classes)


def check_known_labels(uri: str, split: str, labels, class_names) -> None:
    """A split may only use the train split's classes; a name that differs from one of them only
    in its Unicode form (folders copied from a Mac: NFD) is named as such."""
    import unicodedata

    unknown = sorted(set(labels) - set(class_names))
    if not unknown:
        return
    nfc = {unicodedata.normalize("NFC", c) for c in class_names}
    hint = ("; they differ from train's only in their Unicode form (NFC vs NFD): rename the "
            "folders or labels alike" if all(unicodedata.normalize("NFC", u) in nfc for u in unknown[:5]) else "")
    raise TargetError(f"{uri}: split {split!r} has labels the train split lacks: {unknown[:5]}{hint}")


def read_split_records(store, split: str, layout: str) -> tuple[list[bytes], list[str], list[str] | None]:
    """Raw (image bytes, class name) records of one split, undecoded, and of an ImageFolder
    split each image's file (what an error about it names; a Parquet split's rows: None)."""
    if layout == "parquet":
        key = f"{split}.parquet"
        table = parquet_split(store, split).read(columns=["image", "label"])
        check_labels_present(table.column("label"), store.join(key))
        images = table.column("image").to_pylist()
        labels = [str(x) for x in table.column("label").to_pylist()]
        for i, (img, lab) in enumerate(zip(images, labels)):
            if not isinstance(img, (bytes, bytearray)):
                raise TargetError(f"{store.join(key)} row {i}: 'image' must be image bytes")
        return images, labels, None
    files = image_folder_files(store, split)
    return [store.read_bytes(k) for k, _ in files], [label for _, label in files], [store.join(k) for k, _ in files]


def _row_where(uri: str, split: str, i: int, files: list[str] | None) -> str:
    """What an error about row ``i`` of a split names: its file (ImageFolder), else its row."""
    return files[i] if files is not None else f"{uri} split {split!r} row {i}"


def decode_split(uri: str, split: str, images: list[bytes], labels: list[str], files: list[str] | None,
                 class_names: list[str], size: tuple[int, int] | None) -> tuple[list[np.ndarray], np.ndarray]:
    """One split's images decoded to ``size`` (each in its own channel count) and its class ids;
    ``files``: an ImageFolder split's, which an undecodable image's error names."""
    if not labels:
        raise TargetError(f"{uri}: split {split!r} is empty")
    index = {c: i for i, c in enumerate(class_names)}
    check_known_labels(uri, split, labels, class_names)
    arrays = [decode_image(b, size, where=_row_where(uri, split, i, files)) for i, b in enumerate(images)]
    return arrays, np.array([index[c] for c in labels], dtype=np.int64)


def load_target(uri: str, splits=SPLITS, s3_endpoint: str | None = None,
                max_side: int = DECODE_MAX_SIDE) -> TargetTask:
    """Read and validate a target task. Raises TargetError with the file or row at fault.

    Every image is decoded to one size, fixed by the train split's first image and
    ``max_side`` (``images.decode_size``), as the scan's Ray Data reader does; the splits are
    grey only when all their images are."""
    store = _open(uri, s3_endpoint)
    layout = detect_layout(store)
    raw = {s: read_split_records(store, s, layout) for s in dict.fromkeys(("train", *splits))}
    train_labels = raw["train"][1]
    class_names = sorted(set(train_labels))
    check_enough_classes(f"{uri} split 'train'", class_names)
    first = decode_image(raw["train"][0][0], where=_row_where(uri, "train", 0, raw["train"][2]))
    size = decode_size(first.shape[:2], max_side)
    decoded = {s: decode_split(uri, s, *raw[s], class_names, size) for s in splits}
    everything = unify_channels([im for arrays, _ in decoded.values() for im in arrays])
    task, at = TargetTask(target_name(uri), uri, class_names), 0
    task.fingerprints = {s: target_fingerprint(map(image_digest, images), labels)
                         for s, (images, labels, _) in raw.items()}
    for s, (arrays, labels) in decoded.items():
        task.splits[s] = TargetSplit(np.stack(everything[at:at + len(arrays)]), labels)
        at += len(arrays)
    return task


def iter_split(uri: str, split: str = "train", s3_endpoint: str | None = None, batch_size: int = 256,
               max_side: int = DECODE_MAX_SIDE, class_names: list[str] | None = None):
    """One split decoded a batch at a time, as the scan's reader decodes it (``ray_data``: the
    size from this split's first image and ``max_side``; the classes ``class_names``, by default
    this split's sorted labels): the class names and an iterator of (images (n, H, W, C) uint8,
    class ids (n,)). Memory holds one batch of image bytes and pixels, not the split (the
    report's bridge over a large target). A batch is RGB when any of its images is in colour
    (the scan decides that for the whole split; a grey teacher sees the same values either way,
    up to rounding)."""
    from .ray_data import probe_target   # the scan's own probe: layout, listing, decode size

    probe = probe_target(uri, split, s3_endpoint, max_side=max_side)
    store, files = probe.store, probe.files
    labels = [label for _, label in files] if files is not None else split_labels(store, split, probe.layout)
    if class_names is None:
        class_names = sorted(set(labels))
        check_enough_classes(f"{uri} split {split!r}", class_names)
    check_known_labels(uri, split, labels, class_names)
    index = {c: i for i, c in enumerate(class_names)}
    ids = np.array([index[c] for c in labels], dtype=np.int64)
    size = probe.shape[:2]

    def chunks():
        if files is None:
            for b in parquet_split(store, split, whole=False).iter_batches(batch_size, columns=["image"]):
                yield b.column("image").to_pylist()
        else:
            for at in range(0, len(files), batch_size):
                yield [store.read_bytes(k) for k, _ in files[at:at + batch_size]]

    paths = [store.join(k) for k, _ in files] if files is not None else None

    def batches():
        at = 0
        for images in chunks():
            arrays = [decode_image(b, size, where=_row_where(uri, split, at + i, paths))
                      for i, b in enumerate(images)]
            yield np.stack(unify_channels(arrays)), ids[at:at + len(arrays)]
            at += len(arrays)
    return list(class_names), batches()


def write_target(store, images_by_split: dict[str, np.ndarray], labels_by_split: dict[str, list[str]]) -> None:
    """Write a target in the Parquet layout (PNG bytes + class names), one file per split."""
    for split, images in images_by_split.items():
        table = pa.table({
            "image": pa.array([encode_png(im) for im in images], type=pa.binary()),
            "label": pa.array(list(labels_by_split[split]), type=pa.string()),
        })
        buf = io.BytesIO()
        pq.write_table(table, buf)
        store.write_bytes(f"{split}.parquet", buf.getvalue())
