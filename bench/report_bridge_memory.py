"""Peak memory of the report's label-space bridge on a photo-sized target: the streamed route
(``report.bridge.load_bridge``: the split read and decoded 256 images at a time) vs the whole
split decoded in memory first (``load_target`` + ``compute_bridge``, the route before session
18), each in a fresh process, measured in one run.

    python bench/report_bridge_memory.py --zoo DEMO_ZOO [--images 3000] [--side 224]

The target is an ImageFolder of Fashion-MNIST test images as ``side`` x ``side`` colour JPEGs
(written once under --work); the teacher is the demo zoo's fm-all-resnet.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

FASHION = "/usr/share/datasets/fashion-mnist"
NAMES = ["T-shirt-top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def make_target(root: Path, images: int, side: int) -> str:
    import numpy as np
    from PIL import Image

    if (root / "train").exists():
        return str(root)
    x = np.frombuffer(gzip.open(f"{FASHION}/t10k-images-idx3-ubyte.gz").read()[16:], np.uint8).reshape(-1, 28, 28)
    y = np.frombuffer(gzip.open(f"{FASHION}/t10k-labels-idx1-ubyte.gz").read()[8:], np.uint8)
    rng = np.random.default_rng(0)
    for i in range(images):
        rgb = (np.stack([x[i]] * 3, -1) * rng.uniform(0.5, 1.0, 3)).astype(np.uint8)
        path = root / "train" / NAMES[y[i]] / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).resize((side, side)).save(path, quality=90)
    return str(root)


def child(route: str, zoo: str, target: str) -> None:
    """One route in this process; prints its peak RSS (MiB) and <J, M> as JSON."""
    from sctd_ray.data.targets import load_target
    from sctd_ray.report.bridge import compute_bridge, load_bridge
    from sctd_ray.zoo.loading import load_teacher
    from sctd_ray.zoo.store import open_store

    store = open_store(zoo)
    if route == "streamed":
        b = load_bridge(store, "fm-all-resnet", "photos", target, device="cpu")
    else:
        task = load_target(target, splits=("train",))
        b = compute_bridge(load_teacher(store, "fm-all-resnet"), task.splits["train"].images,
                           task.splits["train"].labels, "photos", task.class_names, device="cpu")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"route": route, "peak_mib": round(peak), "transport_cost": b.transport_cost,
                      "samples": b.samples}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--side", type=int, default=224)
    ap.add_argument("--work", default="/tmp/sctd-bridge-memory")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    target = make_target(Path(a.work) / f"photos-{a.images}-{a.side}", a.images, a.side)
    baseline = None
    for route in ("baseline", "streamed", "whole"):
        if route == "baseline":   # the imports alone: python, torch, timm, sctd_ray
            code = ("import resource, timm, torch, sctd_ray.report.bridge; "
                    "print(round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))")
            baseline = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                          check=True).stdout)
            print(f"imports only: {baseline} MiB")
            continue
        out = subprocess.run([sys.executable, __file__, "--zoo", a.zoo, "--child", route, a.zoo, target],
                             capture_output=True, text=True, check=True, env={**os.environ})
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{route:9s} peak {r['peak_mib']:5d} MiB (+{r['peak_mib'] - baseline} over the imports), "
              f"<J, M> = {r['transport_cost']:.6f}, {r['samples']} images")


if __name__ == "__main__":
    main()
