"""Scale by simulation: generated zoos of tiny teachers on SeaweedFS, scanned end to end.

Reports per-teacher overhead (scan seconds / teachers) and each worker's peak memory for a
small and a large zoo: the worker's peak must not grow with the zoo's size (teachers are
fetched one at a time, with one prefetched; only result files accumulate, on the store).

    python bench/scan_scale.py [--sizes 100,1000] [--samples 200] [--workers 2]
                               [--out-s3] [--baseline OTHER_CHECKOUT] [--arch resnet50]

--out-s3 writes each run folder (one result file per pair, the ranking) to the same SeaweedFS
instead of a local folder, as a cluster job does; "rest of driver" is the driver's time outside
Ray Data and the scan (Ray start, manifest, ranking, run.json). --baseline also scans each zoo
with `sctd assess` from another checkout of sctd-ray, right after this one's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def generate_zoo(root: Path, n: int, seed: int = 0, arch: str = "test_efficientnet") -> None:
    """n timm teachers (by default the tiny test_efficientnet), 28x28 grey, 3-10 classes,
    random weights."""
    import timm
    from safetensors.torch import save

    from sctd_ray.zoo.teacher import TeacherConfig

    rng = np.random.default_rng(seed)
    base = {}
    for i in range(n):
        k = int(rng.integers(3, 11))
        if k not in base:
            torch.manual_seed(k)
            base[k] = timm.create_model(arch, num_classes=k, in_chans=1).state_dict()
        state = {name: (t + 0.01 * torch.randn_like(t) if t.is_floating_point() else t).contiguous()
                 for name, t in base[k].items()}
        tid = f"sim-{i:05d}"
        d = root / "teachers" / tid
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(save(state))
        cfg = TeacherConfig(tid, arch, k, [f"class-{j}" for j in range(k)],
                            {"input_size": [1, 28, 28], "mean": [0.286], "std": [0.353]},
                            model_args={"in_chans": 1}, source_task={"simulated": True})
        (d / "config.json").write_text(cfg.to_json())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1000")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out-s3", action="store_true", help="write the run folders to the SeaweedFS S3 too")
    ap.add_argument("--baseline", default=None, help="another sctd-ray checkout whose `sctd assess` to run too")
    ap.add_argument("--arch", default="test_efficientnet",
                    help="the teachers' timm architecture (e.g. resnet50: 2048 features)")
    args = ap.parse_args()
    from assess_cli import run_assess
    from s3server import SeaweedS3
    from scan_bench import make_target

    from sctd_ray.zoo.sync import sync

    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="scan-scale-"))
    target = make_target(tmp / "target", args.samples)
    rows = []
    with SeaweedS3(require_auth=True) as s3:
        os.environ.update(s3.env())
        bucket = s3.make_bucket("scale")
        sync(str(target), f"s3://{bucket}/target", progress=False)
        for n in sizes:
            t0 = time.perf_counter()
            generate_zoo(tmp / f"zoo{n}", n, arch=args.arch)
            res = sync(str(tmp / f"zoo{n}"), f"s3://{bucket}/zoo{n}", progress=False)
            t_make = time.perf_counter() - t0
            cli = [sys.executable, "-m", "sctd_ray.cli"]
            t0 = time.perf_counter()
            subprocess.run(cli + ["zoo", "index", f"s3://{bucket}/zoo{n}"], check=True, capture_output=True)
            t_index = time.perf_counter() - t0
            for label, checkout in [("this", None)] + ([("baseline", Path(args.baseline).resolve())]
                                                       if args.baseline else []):
                out = f"s3://{bucket}/run{n}-{label}" if args.out_s3 else str(tmp / f"run{n}-{label}")
                t_total, run = run_assess(f"s3://{bucket}/zoo{n}", f"s3://{bucket}/target", out,
                                          "--workers", str(args.workers), "--rank-by", "sctd", "--metrics",
                                          "sctd,sctd_cost,leep,nce,logme,hscore,transrate", checkout=checkout)
                peaks = [w["peak_rss_mb"] for w in run["workers"]]
                tim = run["timings"]
                row = {"code": label, "teachers": n, "bytes_mb": res.bytes / 1e6, "make_s": t_make,
                       "index_s": t_index, "scan_s": tim["scan_seconds"], "total_s": t_total,
                       "driver_rest_s": tim["total_seconds"] - tim["data_seconds"] - tim["scan_seconds"],
                       "per_teacher_ms": 1000 * tim["scan_seconds"] / n,
                       "worker_peak_rss_mb": max(peaks), "errors": run["errors"]}
                rows.append(row)
                phases = {}   # seconds per phase over the workers, as ms per teacher
                for w in run["workers"]:
                    for k, v in w.get("phase_seconds", {}).items():
                        phases[k] = phases.get(k, 0.0) + 1000 * v / n
                print(json.dumps({**row, "phase_ms_per_teacher": {k: round(v, 1) for k, v in phases.items()}}),
                      flush=True)
    print()
    print(f"{'code':>8s} {'teachers':>8s} {'zoo MB':>8s} {'index s':>8s} {'scan s':>8s} {'ms/teacher':>11s} "
          f"{'rest of driver s':>17s} {'end to end s':>13s} {'worker peak MB':>15s}")
    for r in rows:
        print(f"{r['code']:>8s} {r['teachers']:8d} {r['bytes_mb']:8.0f} {r['index_s']:8.1f} {r['scan_s']:8.1f} "
              f"{r['per_teacher_ms']:11.1f} {r['driver_rest_s']:17.1f} {r['total_s']:13.1f} "
              f"{r['worker_peak_rss_mb']:15.0f}")
    rows = [r for r in rows if r["code"] == "this"]
    if len(rows) > 1:
        print(f"worker peak memory ratio {rows[-1]['teachers']} vs {rows[0]['teachers']} teachers: "
              f"{rows[-1]['worker_peak_rss_mb'] / rows[0]['worker_peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
