"""Where one CPU teacher's finalise (``TeacherStats.compute``, SPEC 3) goes, and two ways of
spreading it over the cores that do not help, measured in one run.

The statistics of one demo teacher over 2,000 Fashion-MNIST test images are collected once and
copied; each copy is finalised (all scores) as the engine does it (one BLAS thread), then with
OpenBLAS's own threads, then with LogME, H-score and TransRate on their own threads (the
``PARALLEL_FINALISE`` lanes, on the CPU). A cProfile of the default route prints its top calls.

    python bench/finalise_profile.py --zoo DEMO_ZOO [--teacher fm-misc-byob] [--repeats 10]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import pstats
import time

import torch

import sctd_ray.stats as stats
from sctd_ray.assess.engine import TeacherRunner, batches_from_arrays, collect_stats, finalise
from sctd_ray.data.sources import fashion_mnist
from sctd_ray.metrics import NAMES
from sctd_ray.zoo.loading import load_teacher
from sctd_ray.zoo.store import open_store


class _NoLimit:
    def limit(self, **_):
        return contextlib.nullcontext()


def _ms(teacher_id, collected, repeats) -> float:
    copies = [copy.deepcopy(collected) for _ in range(repeats)]
    t0 = time.perf_counter()
    for c in copies:
        finalise(teacher_id, c)
    return (time.perf_counter() - t0) / repeats * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--teacher", default="fm-misc-byob")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    teacher = load_teacher(open_store(args.zoo), args.teacher)
    src = fashion_mnist("test")
    images, labels = src.images[:args.samples], src.labels[:args.samples] % 10
    runner = TeacherRunner(teacher, "cpu")
    collected = collect_stats(runner, batches_from_arrays("bench", images, labels, 10, 256), NAMES,
                              torch.float64)
    print(f"teacher {args.teacher}: D={teacher.model.num_features}, {args.samples} samples, "
          f"{torch.get_num_threads()} torch threads")
    _ms(args.teacher, collected, 2)   # warm-up
    one = _ms(args.teacher, collected, args.repeats)
    print(f"finalise, one BLAS thread (the engine's route): {one:8.2f} ms")

    profile = cProfile.Profile()
    copies = [copy.deepcopy(collected) for _ in range(args.repeats)]
    profile.enable()
    for c in copies:
        finalise(args.teacher, c)
    profile.disable()

    blas, lanes = stats._BLAS, stats._parallel_finalise
    stats._BLAS = _NoLimit()
    try:
        many = _ms(args.teacher, collected, args.repeats)
    finally:
        stats._BLAS = blas
    print(f"finalise, OpenBLAS's own threads:               {many:8.2f} ms  ({many / one:.2f}x)")
    stats._parallel_finalise = lambda device: True
    try:
        par = _ms(args.teacher, collected, args.repeats)
    finally:
        stats._parallel_finalise = lanes
    print(f"finalise, factorisations on 3 lanes:            {par:8.2f} ms  ({par / one:.2f}x)")
    print(f"\ncProfile of the engine's route, {args.repeats} finalises (tottime, s):")
    pstats.Stats(profile).sort_stats("tottime").print_stats(10)


if __name__ == "__main__":
    main()
