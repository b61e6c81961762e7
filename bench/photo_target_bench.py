"""A target of phone photographs: what `sctd assess` decodes and holds for it.

    python bench/photo_target_bench.py --zoo DEMO_ZOO [--images 40] [--baseline OTHER_CHECKOUT]

Writes an ImageFolder target of N 12-megapixel JPEGs (3000x4000 and 4000x3000, two classes,
the first one grey, as a folder of photos comes), then runs `sctd assess` of the zoo on it in
a fresh process (from this checkout, and with --baseline from another one, e.g. a `git
worktree` of an older commit) and prints, for each: the end-to-end seconds, Ray Data's read +
decode seconds, the scan seconds, each worker's peak RSS, and the bytes of the decoded target
that Ray's object store holds (N x H x W x C of the size every image is decoded to). It also
times one photo's decode, in this process, both ways.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from assess_cli import REPO, run_assess


def make_photos(root: Path, n: int, seed: int = 0) -> Path:
    """N JPEGs of 12 MP (smooth content, ~1 MB each), portrait and landscape, first one grey."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = (4000, 3000) if i % 2 else (3000, 4000)
        small = rng.integers(0, 256, (h // 50, w // 50, 3), np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        path = root / "train" / ("indoor" if i < n // 2 else "outdoor") / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        (img.convert("L") if i == 0 else img).save(path, quality=90)
    return root


def images_module(checkout: Path):
    """``sctd_ray.data.images`` of a checkout, imported under another name."""
    spec = importlib.util.spec_from_file_location(f"images_{abs(hash(str(checkout)))}",
                                                  checkout / "sctd_ray" / "data" / "images.py",
                                                  submodule_search_locations=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "sctd_ray.data"     # its relative import of ..errors resolves to this install
    spec.loader.exec_module(mod)
    return mod


def decoded_shape(checkout: Path, first: bytes) -> tuple:
    """(H, W, C) every image of the target is decoded to by that checkout's rule."""
    mod = images_module(checkout)
    im = mod.decode_image(first)
    if hasattr(mod, "decode_size"):
        return (*mod.decode_size(im.shape[:2]), 3)    # RGB: colour images follow the grey first
    return im.shape                                   # the first image's size and channels


def time_decode(checkout: Path, data: bytes, shape: tuple, repeats: int = 5) -> float:
    mod = images_module(checkout)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mod.decode_image(data, shape[:2], channels=shape[2])
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", required=True, help="a built small demo zoo (sctd zoo build-demo DIR)")
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--baseline", default=None, help="another sctd-ray checkout to compare with")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="photo-target-"))
    try:
        t0 = time.perf_counter()
        target = make_photos(tmp / "photos", args.images)
        print(f"target: {args.images} JPEGs of 12 MP, "
              f"{sum(p.stat().st_size for p in target.rglob('*.jpg')) / 1e6:.1f} MB, "
              f"written in {time.perf_counter() - t0:.1f} s")
        first = next(iter(sorted(target.rglob("*.jpg")))).read_bytes()
        colour = sorted(target.rglob("*.jpg"))[1].read_bytes()
        checkouts = {"this": REPO}
        if args.baseline:
            checkouts["baseline"] = Path(args.baseline).resolve()
        for name, checkout in checkouts.items():
            shape = decoded_shape(checkout, first)
            held = args.images * int(np.prod(shape))
            print(f"{name}: every image decoded to {shape}: {held / 1e6:,.0f} MB in the object store; "
                  f"one colour photo decodes in {time_decode(checkout, colour, shape) * 1e3:.0f} ms")
            out = tmp / f"run-{name}"
            try:
                wall, run = run_assess(str(args.zoo), str(target), str(out), "--workers", "2", checkout=checkout)
            except SystemExit as e:
                print(f"{name}: sctd assess failed: {str(e).strip().splitlines()[-1][:300]}")
                continue
            t = run["timings"]
            rss = ", ".join(f"{w['peak_rss_mb']:,.0f}" for w in run["workers"])
            print(f"{name}: end to end {wall:.1f} s (data {t['data_seconds']:.1f} s, scan "
                  f"{t['scan_seconds']:.1f} s); worker peak RSS {rss} MB; errors {run['errors']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
