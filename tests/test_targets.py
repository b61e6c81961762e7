"""Target readers (issue 2, item 7): Parquet and ImageFolder layouts, and every bad input."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sctd_ray.data.images import encode_png
from sctd_ray.data.targets import load_target, write_target
from sctd_ray.errors import TargetError
from sctd_ray.zoo.store import open_store


def _imgs(n, seed=0, shape=(12, 12)):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape, 1), dtype=np.uint8)


def _write_parquet_target(root, labels=None):
    store = open_store(str(root))
    labels = labels or {"train": ["cat", "dog"] * 3, "val": ["dog", "cat"], "test": ["cat", "dog", "cat"]}
    write_target(store, {s: _imgs(len(v), i) for i, (s, v) in enumerate(labels.items())}, labels)
    return store


def test_parquet_round_trip(tmp_path):
    _write_parquet_target(tmp_path / "t")
    task = load_target(str(tmp_path / "t"))
    assert task.class_names == ["cat", "dog"]
    assert task.splits["train"].images.shape == (6, 12, 12, 1)
    assert task.splits["train"].images.dtype == np.uint8
    assert list(task.splits["train"].labels) == [0, 1] * 3
    assert np.array_equal(task.splits["train"].images, _imgs(6, 0))
    assert list(task.splits["test"].labels) == [0, 1, 0]


def test_imagefolder_layout(tmp_path):
    root = tmp_path / "folder"
    for split, names in {"train": ["a", "b", "a", "b"], "val": ["a", "b"], "test": ["b"]}.items():
        for i, c in enumerate(names):
            p = root / split / c / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(p)
    task = load_target(str(root))
    assert task.class_names == ["a", "b"]
    assert task.splits["train"].images.shape == (4, 8, 8, 3)
    assert list(task.splits["test"].labels) == [1]


def test_missing_split(tmp_path):
    store = _write_parquet_target(tmp_path / "t")
    store.delete("val.parquet")
    with pytest.raises(TargetError, match="missing split 'val'"):
        load_target(str(tmp_path / "t"))


def test_not_a_target(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TargetError, match="not a target task"):
        load_target(str(tmp_path / "empty"))


def test_single_class(tmp_path):
    _write_parquet_target(tmp_path / "t", {"train": ["a"] * 3, "val": ["a"], "test": ["a"]})
    with pytest.raises(TargetError, match="need at least 2"):
        load_target(str(tmp_path / "t"))


def test_unknown_label_in_test(tmp_path):
    _write_parquet_target(tmp_path / "t", {"train": ["a", "b"], "val": ["a"], "test": ["a", "zebra"]})
    with pytest.raises(TargetError, match=r"split 'test' has labels the train split lacks: \['zebra'\]"):
        load_target(str(tmp_path / "t"))


def test_empty_split(tmp_path):
    store = _write_parquet_target(tmp_path / "t")
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": pa.array([], pa.binary()), "label": pa.array([], pa.string())}), buf)
    store.write_bytes("val.parquet", buf.getvalue())
    with pytest.raises(TargetError, match="split 'val' is empty"):
        load_target(str(tmp_path / "t"))


def test_undecodable_image_names_row(tmp_path):
    store = open_store(str(tmp_path / "t"))
    _write_parquet_target(tmp_path / "t")
    imgs = [encode_png(im) for im in _imgs(3)] + [b"not an image"]
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": pa.array(imgs, pa.binary()), "label": ["a", "b", "a", "b"]}), buf)
    store.write_bytes("train.parquet", buf.getvalue())
    with pytest.raises(TargetError, match="undecodable image .*split 'train' row 3: not an image format"):
        load_target(str(tmp_path / "t"))


def test_a_row_without_a_label_is_an_error_naming_it(tmp_path):
    """A null (or blank) label is not a class called "None": the target is refused with the
    row that lacks it, by the probe before a scan (from the footer's statistics: a null count,
    or a smallest label that is blank)."""
    from sctd_ray.data.ray_data import probe_target

    store = _write_parquet_target(tmp_path / "t")
    imgs = [encode_png(im) for im in _imgs(4)]
    for labels, row in ((["a", "b", None, "b"], 2), (["a", " ", "b", "b"], 1)):
        buf = io.BytesIO()
        pq.write_table(pa.table({"image": pa.array(imgs, pa.binary()),
                                 "label": pa.array(labels, pa.string())}), buf)
        store.write_bytes("train.parquet", buf.getvalue())
        for read in (lambda: load_target(str(tmp_path / "t")), lambda: probe_target(str(tmp_path / "t"))):
            with pytest.raises(TargetError, match=rf"train.parquet: 1 row\(s\) without a label; the first is row {row}"):
                read()


def test_wrong_columns_and_not_parquet(tmp_path):
    store = _write_parquet_target(tmp_path / "t")
    buf = io.BytesIO()
    pq.write_table(pa.table({"img": pa.array([b"x"], pa.binary())}), buf)
    store.write_bytes("train.parquet", buf.getvalue())
    with pytest.raises(TargetError, match="missing column"):
        load_target(str(tmp_path / "t"))
    store.write_bytes("train.parquet", b"garbage")
    with pytest.raises(TargetError, match="not a Parquet file"):
        load_target(str(tmp_path / "t"))


def _save(path, image, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kw)


def test_decode_size_is_the_first_images_square_at_most_max_side():
    from sctd_ray.data.images import DECODE_MAX_SIDE, decode_size

    assert decode_size((28, 28)) == (28, 28)            # a uniform small target stays as it is
    assert decode_size((480, 640)) == (480, 480)        # not square: its shorter side
    assert decode_size((3000, 4000)) == (DECODE_MAX_SIDE, DECODE_MAX_SIDE)
    assert decode_size((600, 600)) == (DECODE_MAX_SIDE, DECODE_MAX_SIDE)
    assert decode_size((600, 600), max_side=600) == (600, 600)


def test_photos_of_any_size_mode_and_orientation_decode_to_one_bounded_square(tmp_path):
    """A folder of photographs as they come: the first one grey and not square, later ones in
    colour, larger, 16-bit, taken sideways. All decode to the first one's shorter side, in
    RGB; an image of another shape is centre-cropped, not squashed."""
    root = tmp_path / "photos"
    ramp = np.tile(np.linspace(0, 255, 60).astype(np.uint8), (40, 1))             # 40 x 60 grey
    _save(root / "train" / "a" / "0.png", Image.fromarray(ramp))
    thirds = np.zeros((40, 120, 3), np.uint8)                                      # red | green | blue
    thirds[:, :40, 0], thirds[:, 40:80, 1], thirds[:, 80:, 2] = 255, 255, 255
    _save(root / "train" / "b" / "1.png", Image.fromarray(thirds))
    deep = (np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)             # 16-bit grey
    _save(root / "train" / "a" / "2.png", Image.fromarray(deep))
    side = Image.fromarray(np.tile(np.linspace(0, 255, 80).astype(np.uint8), (40, 1)))   # 40 x 80
    exif = side.getexif()
    exif[0x0112] = 6                                       # "rotate 90 degrees clockwise to view"
    _save(root / "train" / "b" / "3.jpg", side.convert("RGB"), exif=exif, quality=95)
    big = np.random.default_rng(0).integers(0, 256, (60, 80, 3), np.uint8)
    _save(root / "train" / "b" / "4.jpg", Image.fromarray(big).resize((1600, 1200)), quality=90)

    task = load_target(str(root), splits=("train",))
    images = task.splits["train"].images
    assert images.shape == (5, 40, 40, 3)
    first, deep8, crop, upright, large = images          # in key order: a/0, a/2, b/1, b/3, b/4
    assert (first[..., 0] == first[..., 1]).all() and (first[..., 0] == first[..., 2]).all()
    assert np.array_equal(first[..., 0], ramp[:, 10:50])                 # the centre, 1:1
    assert (crop[..., 1] == 255).all() and (crop[..., [0, 2]] == 0).all()   # green only: cropped
    assert 100 < deep8.mean() < 160 and deep8.max() >= 245 and deep8.min() == 0   # scaled, not clipped
    assert upright[:, :, 0].std(axis=1).mean() < 4 < upright[:, :, 0].std(axis=0).mean()   # turned upright
    assert large.std() > 30                                             # a real (reduced) decode

    small = load_target(str(root), splits=("train",), max_side=16).splits["train"].images
    assert small.shape == (5, 16, 16, 3)


def test_probe_reads_a_parquet_split_by_ranges_not_whole(tmp_path, monkeypatch):
    """Checking a target before a scan (its layout, first image, size and channels) reads the
    Parquet footer and first row group, not the whole split; errors are the whole read's."""
    from sctd_ray.data.ray_data import probe_target

    store = open_store(str(tmp_path / "t"))
    images = _imgs(400, shape=(32, 32))
    table = pa.table({"image": pa.array([encode_png(im) for im in images], pa.binary()),
                      "label": pa.array(["cat", "dog"] * 200)})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=20)
    store.write_bytes("train.parquet", buf.getvalue())
    read, real = [], type(store).read_range
    with monkeypatch.context() as m:
        m.setattr(type(store), "read_range",
                  lambda self, key, start, length: read.append(length) or real(self, key, start, length))
        m.setattr(type(store), "read_bytes", lambda self, key: pytest.fail(f"the whole of {key} was read"))
        probe = probe_target(str(tmp_path / "t"))
    assert probe.layout == "parquet" and probe.shape == (32, 32, 1)
    assert 0 < sum(read) < len(buf.getvalue()) / 4   # the footer and the first page
    store.write_bytes("train.parquet", b"garbage")
    with pytest.raises(TargetError, match="not a Parquet file"):
        probe_target(str(tmp_path / "t"))
    store.write_bytes("val.parquet", buf.getvalue())
    store.delete("train.parquet")
    with pytest.raises(TargetError, match="missing split 'train'"):
        probe_target(str(tmp_path / "t"), "train")
    assert probe_target(str(tmp_path / "t"), "val").shape == (32, 32, 1)


def test_preprocessing_maps_size_channels_and_builds_its_constants_once():
    """A teacher's preprocessing (SPEC 0): grey 4x4 to its RGB 8x8 input, its mean and std; the
    mean/std tensors are made once per device and dtype, not per batch (on a GPU each would be
    a copy that waits for the queued kernels)."""
    import torch

    from sctd_ray.data.preprocess import Preprocessing, normalisation

    pre = Preprocessing((3, 8, 8), (0.5, 0.4, 0.3), (0.2, 0.2, 0.1))
    x = torch.full((2, 4, 4, 1), 255, dtype=torch.uint8)
    normalisation.cache_clear()
    out = pre(x)
    assert out.shape == (2, 3, 8, 8)
    for ch, (m, s) in enumerate(zip(pre.mean, pre.std)):
        torch.testing.assert_close(out[:, ch], torch.full((2, 8, 8), (1 - m) / s))
    pre(x)
    pre(x)
    info = normalisation.cache_info()
    assert info.misses == 1 and info.hits == 2


def test_large_host_images_are_resized_a_few_at_a_time_with_the_same_values(monkeypatch):
    """A batch of decoded photos is made float and resized in chunks on the host (a batch of
    256 at 512 px would be 0.8 GB of float at once); the values are those of one pass."""
    import torch

    from sctd_ray.data import preprocess
    from sctd_ray.data.preprocess import Preprocessing

    x = torch.randint(0, 256, (10, 40, 40, 3), dtype=torch.uint8)
    pre = Preprocessing((1, 8, 8), (0.5,), (0.25,))
    whole = pre.resize(x)
    calls = []
    real = preprocess.F.interpolate
    monkeypatch.setattr(preprocess.F, "interpolate", lambda t, **kw: calls.append(len(t)) or real(t, **kw))
    monkeypatch.setattr(preprocess, "HOST_RESIZE_CHUNK_BYTES", 3 * 40 * 40 * 3 * 4)
    chunked = pre.resize(x)
    assert calls == [3, 3, 3, 1] and torch.equal(chunked, whole)


def test_an_image_folder_is_what_a_user_sees_in_it(tmp_path):
    """Hidden files and folders and non-image files are not part of a split; GIF and TIFF
    images are; an image in a nested folder is an error naming it, for the scan's probe (before
    Ray) and for the reader alike, never a class named after the nested folder."""
    from sctd_ray.data.ray_data import probe_target

    root = tmp_path / "mine"
    pic = lambda v: Image.fromarray(np.full((8, 8), v, np.uint8))  # noqa: E731
    for split in ("train", "val", "test"):
        _save(root / split / "T shirt" / "a.png", pic(10))
        _save(root / split / "Coat" / "b.tif", pic(20))
        _save(root / split / "bag" / "c.GIF", pic(30))
        (root / split / "bag" / ".DS_Store").write_bytes(b"\0junk")
        (root / split / "bag" / "README.txt").write_text("notes")
        _save(root / split / "bag" / "._c.png", pic(0))                       # macOS metadata
        _save(root / split / ".ipynb_checkpoints" / "a-checkpoint.png", pic(40))
    task = load_target(str(root))
    assert task.class_names == ["Coat", "T shirt", "bag"]
    assert sorted(task.splits["train"].images[:, 0, 0, 0].tolist()) == [10, 20, 30]
    _save(root / "train" / "bag" / "more" / "d.png", pic(50))
    for read in (lambda: load_target(str(root)), lambda: probe_target(str(root))):
        with pytest.raises(TargetError, match=r"bag/more/d.png: expected train/<class>/<image>"):
            read()


def test_a_parquet_label_or_image_of_another_type_is_refused_by_the_probe(tmp_path):
    from sctd_ray.data.ray_data import probe_target

    store = _write_parquet_target(tmp_path / "t")
    png = encode_png(_imgs(1)[0])
    for table, needle in [
            (pa.table({"image": [png, png], "label": pa.array([[0], [1]])}), "'label' must hold class names"),
            (pa.table({"image": ["x.png", "y.png"], "label": ["cat", "dog"]}), "'image' must hold image bytes")]:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        store.write_bytes("train.parquet", buf.getvalue())
        for read in (lambda: load_target(str(tmp_path / "t")), lambda: probe_target(str(tmp_path / "t"))):
            with pytest.raises(TargetError, match=needle):
                read()


def test_split_labels_are_checked_from_listings_and_label_columns(tmp_path):
    import unicodedata

    from sctd_ray.data.targets import check_split_labels

    root = tmp_path / "mine"
    pic = Image.fromarray(np.zeros((8, 8), np.uint8))
    for split in ("train", "test"):
        for c in ("Größe", "bag"):
            _save(root / split / c / "a.png", pic)
    with pytest.raises(TargetError, match="missing or empty split 'val'"):
        check_split_labels(str(root))
    _save(root / "val" / unicodedata.normalize("NFD", "Größe") / "a.png", pic)   # copied from a Mac
    with pytest.raises(TargetError, match="differ from train's only in their Unicode form"):
        check_split_labels(str(root))
    (root / "val" / unicodedata.normalize("NFD", "Größe") / "a.png").rename(root / "val" / "a.png")
    _save(root / "val" / "bag" / "a.png", pic)
    (root / "val" / "a.png").unlink()
    check_split_labels(str(root))
    _write_parquet_target(tmp_path / "pq", {"train": ["cat"] * 3, "val": ["cat"], "test": ["cat"]})
    with pytest.raises(TargetError, match="1 class"):
        check_split_labels(str(tmp_path / "pq"))


def test_scan_refuses_a_target_without_val_before_ray_starts(demo_zoo, tmp_path):
    """`sctd scan` distills after assessing: a split it will need is checked first, not after
    every teacher was scored."""
    import shutil
    import subprocess
    import sys

    target = tmp_path / "dg"
    shutil.copytree(f"{demo_zoo}/targets/dg-high5", target)
    (target / "val.parquet").unlink()
    p = subprocess.run([sys.executable, "-m", "sctd_ray.cli", "scan", "--zoo", demo_zoo, "--target",
                        str(target), "--out", str(tmp_path / "run"), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "missing split 'val'" in lines[0], p.stderr
    assert not (tmp_path / "run" / "ranking.parquet").exists()


def test_iter_split_decodes_a_split_as_the_scans_reader(tmp_path):
    """The report's streamed reader sizes a split from its own first image and takes its classes
    from the split (or as given), as the scan's probe and Ray Data reader do; one listing."""
    from PIL import Image

    from sctd_ray.data.ray_data import probe_target
    from sctd_ray.data.targets import iter_split

    for split, (w, h), n in (("train", (30, 20), 4), ("val", (40, 40), 3)):
        for i in range(n):
            label = "ab"[i % 2]
            path = tmp_path / "t" / split / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (w, h), (40 * i, 0, 0)).save(path)
    uri = str(tmp_path / "t")
    classes, batches = iter_split(uri, "val", batch_size=2)
    got = list(batches)
    assert classes == ["a", "b"] and [len(y) for _, y in got] == [2, 1]
    assert got[0][0].shape[1:] == probe_target(uri, "val").shape == (40, 40, 3)
    classes, batches = iter_split(uri, "val", class_names=["a", "b", "c"])
    assert classes == ["a", "b", "c"] and [y.tolist() for _, y in batches] == [[0, 0, 1]]   # a/0, a/2, b/1


def test_an_undecodable_image_in_a_folder_is_named_by_its_file(tmp_path):
    """In an ImageFolder split an error names the file, not a row number the user cannot map
    to one: the scan's probe (its first image), the distillation's reader and the report's."""
    from sctd_ray.data.ray_data import probe_target
    from sctd_ray.data.targets import iter_split

    root = tmp_path / "mine"
    pic = Image.fromarray(np.zeros((8, 8), np.uint8))
    for split in ("train", "val", "test"):
        for c in ("a", "b"):
            _save(root / split / c / "x.png", pic)
    (root / "val" / "b" / "y.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(TargetError, match=r"undecodable image .*mine/val/b/y.png: "):
        load_target(str(root))
    with pytest.raises(TargetError, match=r"undecodable image .*mine/val/b/y.png: "):
        list(iter_split(str(root), "val")[1])
    (root / "train" / "a" / "x.png").write_bytes(b"")
    for read in (lambda: load_target(str(root)), lambda: probe_target(str(root))):
        with pytest.raises(TargetError, match=r"undecodable image .*mine/train/a/x.png: not an image"):
            read()


def test_an_image_over_pillows_pixel_limit_is_a_target_error(monkeypatch):
    """Pillow refuses an image of over 179 megapixels (a decompression bomb) with an error that
    is not an OSError: one line naming the image, not a Ray task's traceback (exit 1)."""
    from sctd_ray.data.images import decode_image
    from sctd_ray.data.ray_data import DecodeBatch

    png = encode_png(np.zeros((64, 64, 1), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)   # 64x64 = 4096 > 2x the limit
    with pytest.raises(TargetError, match=r"undecodable image here: .*exceeds limit.*downscale it"):
        decode_image(png, where="here")
    out = DecodeBatch("t split 'train'", (8, 8), 1)({"image": [png], "label": ["a"]})
    assert "exceeds limit" in out["error"][0]


def test_a_parquet_of_view_types_as_polars_writes_it_is_read(tmp_path):
    """Polars (1.38+) writes strings and binaries as Arrow's view types, which pyarrow reads back
    as string_view / binary_view: a target like that is read as the plain one, and a row without
    a label is still named."""
    from sctd_ray.data.ray_data import probe_target
    from sctd_ray.data.targets import iter_split

    _write_parquet_target(tmp_path / "plain")
    for split in ("train", "val", "test"):
        t = pq.read_table(tmp_path / "plain" / f"{split}.parquet")
        (tmp_path / "view").mkdir(exist_ok=True)
        pq.write_table(pa.table({"image": t["image"].cast(pa.binary_view()),
                                 "label": t["label"].cast(pa.string_view())}),
                       tmp_path / "view" / f"{split}.parquet")
    assert pq.read_schema(tmp_path / "view" / "train.parquet").field("label").type == pa.string_view()
    plain, view = load_target(str(tmp_path / "plain")), load_target(str(tmp_path / "view"))
    assert view.class_names == plain.class_names and view.fingerprints == plain.fingerprints
    assert np.array_equal(view.splits["train"].images, plain.splits["train"].images)
    assert probe_target(str(tmp_path / "view")).shape == (12, 12, 1)
    assert [y.tolist() for _, y in iter_split(str(tmp_path / "view"))[1]] == [[0, 1] * 3]
    pq.write_table(pa.table({"image": t["image"].cast(pa.binary_view()),
                             "label": pa.array(["cat", None, "dog"], pa.string_view())}),
                   tmp_path / "view" / "train.parquet")
    for read in (lambda: load_target(str(tmp_path / "view")), lambda: probe_target(str(tmp_path / "view"))):
        with pytest.raises(TargetError, match=r"1 row\(s\) without a label; the first is row 1"):
            read()
