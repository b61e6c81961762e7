"""Teacher forward time on the CPU by memory order: channels_last (the engine's default) vs
the contiguous (NCHW) order a plain timm loop uses, every teacher of a demo zoo, the two
alternated within one run (best of --repeats each), with the largest relative difference of
the features the two orders give.

    python bench/forward_bench.py --zoo ~/.cache/sctd-ray/demo-zoo [--threads 1] [--samples 2000]

One thread is what a CPU scan worker uses (one actor per CPU slot).
"""

from __future__ import annotations

import argparse
import time

import torch

from sctd_ray.assess.engine import TeacherRunner
from sctd_ray.data.sources import fashion_mnist
from sctd_ray.zoo.loading import load_teacher
from sctd_ray.zoo.manifest import list_teacher_ids
from sctd_ray.zoo.store import open_store


def forward_seconds(runner: TeacherRunner, x: torch.Tensor, batch_size: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(x), batch_size):
        runner.forward(x[i:i + batch_size])
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", required=True, help="a built demo zoo (sctd zoo build-demo DIR)")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    zoo = open_store(args.zoo)
    x = torch.from_numpy(fashion_mnist("test").images[: args.samples].copy())
    total = {False: 0.0, True: 0.0}
    worst = 0.0
    print(f"{args.samples} Fashion-MNIST images, batch {args.batch_size}, {args.threads} thread(s)")
    print(f"{'teacher':22s} {'architecture':18s} {'NCHW ms':>9s} {'NHWC ms':>9s} {'ratio':>6s}  max rel diff")
    for tid in list_teacher_ids(zoo):
        teacher = load_teacher(zoo, tid)
        runners = {cl: TeacherRunner(teacher, "cpu", channels_last=cl) for cl in (False, True)}
        best = {False: float("inf"), True: float("inf")}
        for _ in range(args.repeats):
            for cl in (False, True):
                runners[cl].model.to(memory_format=runners[cl].memory_format)  # one model, two orders
                best[cl] = min(best[cl], forward_seconds(runners[cl], x, args.batch_size))
        feats = {}
        for cl in (False, True):
            runners[cl].model.to(memory_format=runners[cl].memory_format)
            feats[cl] = runners[cl].forward(x[:256])[0].double()
        rel = float(((feats[True] - feats[False]).abs().max() / feats[False].abs().max()))
        worst = max(worst, rel)
        for cl in (False, True):
            total[cl] += best[cl]
        print(f"{tid:22s} {teacher.config.architecture:18s} {best[False] * 1e3:9.0f} {best[True] * 1e3:9.0f} "
              f"{best[True] / best[False]:6.3f}  {rel:.1e}")
    print(f"{'all teachers':41s} {total[False] * 1e3:9.0f} {total[True] * 1e3:9.0f} "
          f"{total[True] / total[False]:6.3f}  {worst:.1e}")


if __name__ == "__main__":
    main()
