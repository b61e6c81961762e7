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

Threads on the CPU: a CPU scan runs one actor per CPU slot and Ray gives a ``num_cpus=1`` actor
``OMP_NUM_THREADS=1``, so each worker's torch runs one thread (``--threads 1``, the default).
``--workers K`` runs K such workers side by side in their own processes, each timing every
teacher, in step (a barrier before each teacher): the load of a CPU scan on K cores.
``--threads 0`` gives torch all the cores in one process (this bench's setting before session 20,
which a scan runs when it has fewer workers than CPUs, e.g. ``--workers 1``).

    python bench/engine_bench.py --zoo DEMO_ZOO --workers 2          # a 2-core scan's load
    python bench/engine_bench.py --zoo DEMO_ZOO --threads 0          # one process, all cores
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


def _parser():
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
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU: torch threads per worker (default 1, a scan worker's; 0: torch's default, all cores)")
    ap.add_argument("--workers", type=int, default=1,
                    help="CPU: this many workers side by side, one process each (a scan's actors)")
    return ap


def _inputs(args):
    """The teachers and the target (images, labels) the bench times."""
    if args.zoo or (args.device == "cpu" and not args.arch):
        from pathlib import Path

        from sctd_ray.cli import default_home
        from sctd_ray.data.sources import fashion_mnist

        zoo = args.zoo or str(Path(default_home()) / "demo-zoo")
        teachers = demo_teachers(zoo)
        src = fashion_mnist("test")
        return teachers, src.images[:args.samples], src.labels[:args.samples] % args.classes
    teachers = [synthetic_teacher(args.arch or "resnet50", args.teacher_classes, args.size)]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.samples, 64, 64, 3), dtype=np.uint8)
    return teachers, images, np.arange(args.samples) % args.classes


def _time_all(args, barrier=None) -> tuple[int, list[tuple]]:
    """The number of target images and, per teacher: (id, forward s, engine s, update s, finalise s, [(forward, engine)] per repeat).
    With ``barrier``, every worker starts each teacher together."""
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    teachers, images, labels = _inputs(args)
    rows = []
    for t in teachers:
        if barrier is not None:
            barrier.wait()
        pairs = []
        f, e, u, z = time_teacher(t, images, labels, args.classes, args.device, args.batch_size,
                                  args.repeats, tuple(args.metrics.split(",")),
                                  channels_last=not args.contiguous, pairs=pairs)
        rows.append((t.teacher_id, f, e, u, z, pairs))
    return len(labels), rows


def _worker(args, barrier, results, index):
    results.put((index, _time_all(args, barrier)))


def _time_workers(args) -> list[tuple[int, list[tuple]]]:
    """``_time_all`` in ``args.workers`` processes at once (spawned: a fresh torch each)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(args.workers), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(args, barrier, results, i)) for i in range(args.workers)]
    for p in procs:
        p.start()
    out = dict(results.get() for _ in procs)
    for p in procs:
        p.join()
    return [out[i] for i in range(args.workers)]


def main():
    args = _parser().parse_args()
    cpu = args.device == "cpu"
    if not cpu and args.workers != 1:
        raise SystemExit("--workers is for the CPU: one GPU worker holds the device")
    if args.workers < 1:
        raise SystemExit("--workers must be at least 1")
    timed = _time_workers(args) if args.workers > 1 else [_time_all(args)]
    threads = (args.threads if args.threads > 0 else torch.get_num_threads()) if cpu else None
    labels_n, rows = timed[0]
    per_worker = [r for _, r in timed]
    print(f"device={args.device} samples={labels_n} batch={args.batch_size} metrics={args.metrics}"
          f" memory={'contiguous' if args.contiguous else 'channels_last'}"
          + (f" gpu={torch.cuda.get_device_name()}" if not cpu
             else f" threads={threads} workers={args.workers}")
          + (" (times: the mean over the workers)" if args.workers > 1 else ""))
    print(f"{'teacher':28s} {'forward s':>10s} {'engine s':>10s} {'ratio':>7s} {'engine img/s':>13s}"
          f" {'update ms':>10s} {'finalise ms':>12s}")
    k = len(per_worker)
    tf = te = tu = tz = 0.0
    paired = np.zeros((args.repeats, 2))   # repeat r: sum over workers and teachers of (forward, engine)
    for i, (tid, *_rest) in enumerate(rows):
        f, e, u, z = (sum(w[i][j] for w in per_worker) / k for j in (1, 2, 3, 4))
        for w in per_worker:
            paired += np.array(w[i][5])
        tf, te, tu, tz = tf + f, te + e, tu + u, tz + z
        print(f"{tid:28s} {f:10.4f} {e:10.4f} {e / f:7.3f} {labels_n / e:13.0f}"
              f" {1e3 * u:10.1f} {1e3 * z:12.1f}")
    print(f"{'TOTAL':28s} {tf:10.4f} {te:10.4f} {te / tf:7.3f} {'':13s} {1e3 * tu:10.1f} {1e3 * tz:12.1f}"
          f"\n(engine throughput = {100 * tf / te:.1f}% of pure forward; update and finalise are the "
          f"best of the repeats of one more engine pass, timed apart)")
    ratios = np.sort(paired[:, 1] / paired[:, 0])
    print(f"paired ratio (each repeat's engine over the forward timed just before it, summed over "
          f"the teachers{' and workers' if k > 1 else ''}): median {np.median(ratios):.3f}, "
          f"range {ratios[0]:.3f}-{ratios[-1]:.3f} over {len(ratios)} repeats")


if __name__ == "__main__":
    main()
