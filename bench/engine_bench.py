"""Scoring overhead of the engine: (forward + all statistics + scores) / (forward alone).

CPU (default): every teacher of a demo zoo on Fashion-MNIST test images.
CUDA: a larger timm teacher (default resnet50 at 224, bf16 autocast, channels_last).

    python bench/engine_bench.py --zoo ~/.cache/sctd-ray/demo-zoo          # CPU, demo teachers
    python bench/engine_bench.py --device cuda --arch resnet50 --samples 16384
    python bench/engine_bench.py --arch resnet50 --size 64 --samples 100 --classes 5   # CPU, few-shot

Prints per-teacher times and the overall ratio, measured in one run (best of --repeats), and the
median of the paired ratios (each repeat's engine over the forward timed just before it): on a
VM whose speed drifts within minutes, the best-of times of the two sides can come from different
moments, the pairs cannot.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from sctd_ray.assess.engine import TeacherRunner, batches_from_arrays, collect_stats, finalise
from sctd_ray.metrics import NAMES


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class _TimedForward:
    """A TeacherRunner whose forward passes are timed (synchronised, so the engine's own loop,
    ``collect_stats``, can be timed apart from them)."""

    def __init__(self, runner):
        self.runner, self.seconds = runner, 0.0
        self.weight, self.device = runner.weight, runner.device

    def forward(self, images):
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.runner.forward(images)
        _sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out


def time_teacher(teacher, images, labels, num_classes, device, batch_size, repeats, metrics=NAMES,
                 channels_last=True, pairs=None):
    """Best-of-``repeats`` seconds: (forward alone, engine, its update, its finalise). ``pairs``,
    a list, also receives each repeat's (forward, engine) seconds, timed one right after the
    other (a drift of the machine's speed moves both)."""
    runner = TeacherRunner(teacher, device, channels_last=channels_last)
    dtype = torch.float32 if runner.cuda else torch.float64
    x = torch.from_numpy(np.ascontiguousarray(images).copy())
    y = torch.from_numpy(labels)
    if runner.cuda:  # the scan keeps the target on the device when it fits
        x, y = x.to(device), y.to(device)
    tb = batches_from_arrays("bench", images, labels, num_classes, batch_size)
    tb.batches = lambda: ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size))

    def forward_only():
        for xb, _ in tb.batches():
            runner.forward(xb)
        _sync(device)

    def engine():
        s = collect_stats(runner, tb, metrics, dtype)
        out = finalise(teacher.teacher_id, s)
        _sync(device)
        return out

    def parts():  # the engine once more, its two extra costs timed apart: update, finalise
        timed = _TimedForward(runner)
        t0 = time.perf_counter()
        s = collect_stats(timed, tb, metrics, dtype)
        _sync(device)
        t_upd = time.perf_counter() - t0 - timed.seconds
        t0 = time.perf_counter()
        finalise(teacher.teacher_id, s)
        _sync(device)
        return t_upd, time.perf_counter() - t0

    forward_only(), engine()  # warm-up (cudnn autotune, allocator)
    t_fwd, t_eng, t_parts = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter(); forward_only(); t_fwd.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); engine(); t_eng.append(time.perf_counter() - t0)
        t_parts.append(parts())
    if pairs is not None:
        pairs.extend(zip(t_fwd, t_eng))
    return min(t_fwd), min(t_eng), min(p[0] for p in t_parts), min(p[1] for p in t_parts)


def demo_teachers(zoo):
    from sctd_ray.zoo.loading import load_teacher
    from sctd_ray.zoo.manifest import list_teacher_ids
    from sctd_ray.zoo.store import open_store

    store = open_store(zoo)
    return [load_teacher(store, t) for t in list_teacher_ids(store)]


def synthetic_teacher(arch, num_classes, size):
    import timm

    from sctd_ray.data.preprocess import Preprocessing
    from sctd_ray.zoo.loading import LoadedTeacher
    from sctd_ray.zoo.teacher import TeacherConfig

    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=num_classes)
    cfg = TeacherConfig(arch, arch, num_classes, [f"c{i}" for i in range(num_classes)],
                        {"input_size": [3, size, size], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]})
    return LoadedTeacher(cfg, model.eval(), Preprocessing.from_pretrained_cfg(cfg.pretrained_cfg))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default=None, help="zoo whose teachers to time (CPU default: the demo zoo)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default=None,
                    help="a synthetic timm teacher instead of a zoo (the CUDA default: resnet50)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--teacher-classes", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=10, help="target classes")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7, help="best of this many (this VM's speed drifts)")
    ap.add_argument("--metrics", default=",".join(NAMES), help="scores to compute (default: all of metrics.NAMES)")
    ap.add_argument("--contiguous", action="store_true",
                    help="run the teachers in NCHW order (before session 7 the CPU default) instead of channels_last")
    args = ap.parse_args()

    if args.zoo or (args.device == "cpu" and not args.arch):
        from pathlib import Path

        from sctd_ray.cli import default_home
        from sctd_ray.data.sources import fashion_mnist

        zoo = args.zoo or str(Path(default_home()) / "demo-zoo")
        teachers = demo_teachers(zoo)
        src = fashion_mnist("test")
        images, labels = src.images[:args.samples], src.labels[:args.samples] % args.classes
    else:
        teachers = [synthetic_teacher(args.arch or "resnet50", args.teacher_classes, args.size)]
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (args.samples, 64, 64, 3), dtype=np.uint8)
        labels = np.arange(args.samples) % args.classes
    torch.set_grad_enabled(False)
    metrics = tuple(args.metrics.split(","))
    print(f"device={args.device} samples={len(labels)} batch={args.batch_size} metrics={','.join(metrics)}"
          f" memory={'contiguous' if args.contiguous else 'channels_last'}"
          + (f" gpu={torch.cuda.get_device_name()}" if args.device.startswith("cuda") else f" threads={torch.get_num_threads()}"))
    print(f"{'teacher':28s} {'forward s':>10s} {'engine s':>10s} {'ratio':>7s} {'engine img/s':>13s}"
          f" {'update ms':>10s} {'finalise ms':>12s}")
    tf = te = tu = tz = 0.0
    paired = np.zeros((args.repeats, 2))   # repeat r: sum over teachers of (forward, engine)
    for t in teachers:
        pairs = []
        f, e, u, z = time_teacher(t, images, labels, args.classes, args.device, args.batch_size,
                                  args.repeats, metrics, channels_last=not args.contiguous, pairs=pairs)
        paired += np.array(pairs)
        tf, te, tu, tz = tf + f, te + e, tu + u, tz + z
        print(f"{t.teacher_id:28s} {f:10.4f} {e:10.4f} {e / f:7.3f} {len(labels) / e:13.0f}"
              f" {1e3 * u:10.1f} {1e3 * z:12.1f}")
    print(f"{'TOTAL':28s} {tf:10.4f} {te:10.4f} {te / tf:7.3f} {'':13s} {1e3 * tu:10.1f} {1e3 * tz:12.1f}"
          f"\n(engine throughput = {100 * tf / te:.1f}% of pure forward; update and finalise are the "
          f"best of the repeats of one more engine pass, timed apart)")
    ratios = np.sort(paired[:, 1] / paired[:, 0])
    print(f"paired ratio (each repeat's engine over the forward timed just before it, summed over "
          f"the teachers): median {np.median(ratios):.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f} "
          f"over {len(ratios)} repeats")


if __name__ == "__main__":
    main()
