"""`sctd assess` end to end vs a naive sequential scan, on a real SeaweedFS S3 zoo.

Zoo: the small demo zoo's teachers under --copies ids each (default 4 x 8 = 32 teachers),
pushed to a SeaweedFS server started here. Target: --samples Fashion-MNIST test images
(10 classes), as a Parquet target on the same S3: 28x28 PNGs, or with --image-size S enlarged to
S x S JPEGs (a target of photographs: each image costs a photo's decode, every teacher still
sees 28-32 px inputs).

- naive: for each teacher, download config + weights, build the model, run a torch DataLoader
  that reads the target Parquet from S3 and decodes its PNGs, compute the same metrics;
- sctd assess: the CLI in a subprocess, end to end (Ray start-up included);
- pure forward: teachers already in memory, images already decoded, forward passes only.

    python bench/scan_bench.py [--zoo DEMO_ZOO] [--copies 4] [--samples 2000] [--workers 2] [--image-size S]
                               [--baseline OTHER_CHECKOUT]

With --baseline, `sctd assess` from another checkout of sctd-ray (e.g. a `git worktree` of an
older commit) scans the same zoo and target right after this one's: its time, scores and
workers' peak memory are printed beside this checkout's.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def make_zoo(demo: str, dst: Path, copies: int) -> Path:
    shutil.copytree(demo, dst, ignore=shutil.ignore_patterns("manifest.parquet", "targets"))
    teachers = dst / "teachers"
    for p in sorted(teachers.iterdir()):
        for k in range(1, copies):
            shutil.copytree(p, teachers / f"{p.name}-c{k}")
    return dst


def make_target(dst: Path, samples: int, image_size: int | None = None) -> Path:
    """Fashion-MNIST test images as a Parquet target: 28x28 PNGs, or with ``image_size`` each
    image enlarged (bicubic) to that size and stored as a JPEG (quality 90), the way a target of
    photographs arrives: the same labels, a decode cost per image like a photo's."""
    from sctd_ray.data.sources import fashion_mnist
    from sctd_ray.data.targets import write_target
    from sctd_ray.zoo.store import open_store

    src = fashion_mnist("test")
    names = list(src.class_names)
    split = {"train": slice(0, samples), "val": slice(samples, samples + 100), "test": slice(samples + 100, samples + 200)}
    if image_size is None:
        write_target(open_store(str(dst)), {k: src.images[v] for k, v in split.items()},
                     {k: [names[i] for i in src.labels[v]] for k, v in split.items()})
        return dst
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def jpeg(a):
        buf = io.BytesIO()
        Image.fromarray(a[:, :, 0]).resize((image_size, image_size), Image.BICUBIC).save(buf, "JPEG", quality=90)
        return buf.getvalue()
    dst.mkdir(parents=True, exist_ok=True)
    for k, v in split.items():
        pq.write_table(pa.table({"image": pa.array([jpeg(a) for a in src.images[v]], type=pa.binary()),
                                 "label": pa.array([names[i] for i in src.labels[v]], type=pa.string())}),
                       dst / f"{k}.parquet")
    return dst


class ParquetImages(torch.utils.data.Dataset):
    """The naive reader: PNG decode per item, every epoch, every teacher."""

    def __init__(self, data: bytes):
        import pyarrow.parquet as pq

        t = pq.read_table(io.BytesIO(data))
        self.images = t.column("image").to_pylist()
        labels = t.column("label").to_pylist()
        self.classes = sorted(set(labels))
        self.labels = [self.classes.index(v) for v in labels]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from sctd_ray.data.images import decode_image

        return torch.from_numpy(decode_image(self.images[i]).copy()), self.labels[i]


def naive_scan(zoo_uri: str, target_uri: str, batch_size: int) -> tuple[dict, float]:
    import timm
    from safetensors.torch import load

    from sctd_ray import metrics
    from sctd_ray.data.preprocess import Preprocessing
    from sctd_ray.zoo.manifest import list_teacher_ids
    from sctd_ray.zoo.store import open_store
    from sctd_ray.zoo.teacher import TeacherConfig

    t0 = time.perf_counter()
    zoo, tstore = open_store(zoo_uri), open_store(target_uri)
    scores = {}
    for tid in list_teacher_ids(zoo):
        cfg = TeacherConfig.from_json(tid, zoo.read_bytes(f"teachers/{tid}/config.json"))
        model = timm.create_model(cfg.architecture, num_classes=cfg.num_classes, **cfg.model_args)
        model.load_state_dict(load(zoo.read_bytes(f"teachers/{tid}/model.safetensors")))
        model.eval()
        pre = Preprocessing.from_pretrained_cfg(cfg.pretrained_cfg)
        ds = ParquetImages(tstore.read_bytes("train.parquet"))
        feats, logits, labels = [], [], []
        with torch.inference_mode():
            for x, y in torch.utils.data.DataLoader(ds, batch_size=batch_size):
                f = model.forward_head(model.forward_features(pre(x)), pre_logits=True)
                feats.append(f.double()), logits.append(model.get_classifier()(f).double()), labels.append(y)
        f, z, y = torch.cat(feats), torch.cat(logits), torch.cat(labels)
        scores[tid] = metrics.compute_all(torch.softmax(z, 1), y, f, model.get_classifier().weight.double())
    return scores, time.perf_counter() - t0


def pure_forward(zoo_uri: str, target_uri: str, batch_size: int) -> float:
    from sctd_ray.assess.engine import TeacherRunner
    from sctd_ray.data.targets import load_target
    from sctd_ray.zoo.loading import load_teacher
    from sctd_ray.zoo.manifest import list_teacher_ids
    from sctd_ray.zoo.store import open_store

    zoo = open_store(zoo_uri)
    teachers = [load_teacher(zoo, t) for t in list_teacher_ids(zoo)]
    x = torch.from_numpy(load_target(target_uri, splits=("train",)).splits["train"].images)
    t0 = time.perf_counter()
    for t in teachers:
        r = TeacherRunner(t, "cpu")
        for i in range(0, len(x), batch_size):
            r.forward(x[i:i + batch_size])
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default=None, help="a built small demo zoo (default: build one)")
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=None,
                    help="store the target's images enlarged to this size as JPEGs (default: 28x28 PNGs)")
    ap.add_argument("--baseline", default=None, help="another sctd-ray checkout whose `sctd assess` to run too")
    args = ap.parse_args()
    from assess_cli import run_assess
    from s3server import SeaweedS3

    from sctd_ray.metrics import NAMES
    from sctd_ray.zoo.sync import sync

    tmp = Path(tempfile.mkdtemp(prefix="scan-bench-"))
    demo = args.zoo
    if demo is None:
        from sctd_ray.zoo.demo import build_demo

        demo = str(tmp / "demo")
        build_demo(demo, "small", log=lambda *_: None)
    zoo_dir = make_zoo(demo, tmp / "zoo", args.copies)
    target_dir = make_target(tmp / "target", args.samples, args.image_size)
    with SeaweedS3(require_auth=True) as s3:
        os.environ.update(s3.env())
        bucket = s3.make_bucket("bench")
        zoo_uri, target_uri = f"s3://{bucket}/zoo", f"s3://{bucket}/targets/fm10"
        sync(str(zoo_dir), zoo_uri, progress=False)
        sync(str(target_dir), target_uri, progress=False)
        n = len(list((zoo_dir / "teachers").iterdir()))
        print(f"zoo: {n} teachers on SeaweedFS; target: {args.samples} images "
              f"({f'{args.image_size}x{args.image_size} JPEG' if args.image_size else '28x28 PNG'}); "
              f"cpus={os.cpu_count()} torch threads={torch.get_num_threads()}", flush=True)

        naive, t_naive = naive_scan(zoo_uri, target_uri, args.batch_size)
        print(f"naive sequential scan: {t_naive:.1f}s", flush=True)

        out = tmp / "run"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sctd_ray.cli", "zoo", "index", zoo_uri], check=True,
                       capture_output=True)
        t_index = time.perf_counter() - t0
        t_scan, run = run_assess(zoo_uri, target_uri, str(out), "--workers", str(args.workers))
        if args.baseline:
            t_base, run_base = run_assess(zoo_uri, target_uri, str(tmp / "run-baseline"), "--workers",
                                          str(args.workers), checkout=args.baseline)
        t_fwd = pure_forward(str(zoo_dir), str(target_dir), args.batch_size)

    df = pd.read_parquet(out / "ranking.parquet").set_index("teacher_id")
    rel = max(abs(df.loc[t, m] - naive[t][m]) / max(abs(naive[t][m]), 1e-12) for t in naive for m in NAMES)
    tim = run["timings"]
    print()
    print(f"{'naive sequential (download, build, DataLoader, metrics)':58s} {t_naive:8.1f} s")
    print(f"{'sctd assess, end to end (Ray start, read+decode, scan)':58s} {t_scan:8.1f} s   "
          f"speed-up {t_naive / t_scan:.2f}x")
    print(f"{'  of which: data read+decode (Ray Data)':58s} {tim['data_seconds']:8.1f} s")
    print(f"{'  of which: scan (actors: fetch, build, forward, stats)':58s} {tim['scan_seconds']:8.1f} s")
    print(f"{'(sctd zoo index, once per zoo, not in the scan)':58s} {t_index:8.1f} s")
    print(f"{'pure forward (teachers in memory, data decoded, 1 process)':58s} {t_fwd:8.1f} s   "
          f"scan/forward {tim['scan_seconds'] / t_fwd:.2f}, end-to-end/forward {t_scan / t_fwd:.2f}")
    print(f"max relative score difference naive vs scan: {rel:.2e}")
    for w in run.get("workers", []):
        phases = ", ".join(f"{k} {v:.1f}" for k, v in w.get("phase_seconds", {}).items())
        print(f"worker {w['worker']}: {w['teachers']} teachers, peak RSS {w['peak_rss_mb']} MB; "
              f"seconds by phase: {phases}")
    print(f"scan start-up and shut-down outside the two phases above: "
          f"{t_scan - tim['data_seconds'] - tim['scan_seconds']:.1f} s")
    if args.baseline:
        base = pd.read_parquet(tmp / "run-baseline" / "ranking.parquet").set_index("teacher_id")
        rel_b = max(abs(df.loc[t, m] - base.loc[t, m]) / max(abs(base.loc[t, m]), 1e-12) for t in naive for m in NAMES)
        print(f"baseline {args.baseline}: sctd assess end to end {t_base:.1f} s (this / baseline "
              f"{t_scan / t_base:.3f}); max relative score difference to this checkout {rel_b:.2e}")
        for w in run_base.get("workers", []):
            print(f"baseline worker {w['worker']}: {w['teachers']} teachers, peak RSS {w['peak_rss_mb']} MB")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
