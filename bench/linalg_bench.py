"""LogME's linear algebra: ``metrics.eigh_projections`` (tridiagonal form, no eigenvectors of
the Gram) vs a full eigendecomposition followed by ``V^T b``, on one BLAS thread as in
``TeacherStats.compute`` on CPU.

    python bench/linalg_bench.py [--dims 64,128,256,512] [--classes 10]

Prints, per feature dimension D, the best of --repeats for both routes, their ratio and the
largest differences (eigenvalues relative to the largest; squared projections relative to the
largest), measured in one run on a Gram of N = 2000 synthetic post-ReLU features.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from sctd_ray.metrics import eigh_projections


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def full_eigh(gram: np.ndarray, b: np.ndarray):
    w, v = np.linalg.eigh(gram)
    return w, v.T @ b


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="64,128,256,512")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'D':>5s} {'eigh + V^T b ms':>16s} {'eigh_projections ms':>20s} {'ratio':>6s} "
          f"{'max eig diff':>13s} {'max proj^2 diff':>16s}")
    with threadpool_limits(limits=1, user_api="blas"):
        for d in (int(v) for v in args.dims.split(",")):
            f = np.maximum(rng.standard_normal((args.samples, d)) @ rng.standard_normal((d, d)) / np.sqrt(d) + 0.3, 0)
            gram = f.T @ f
            b = rng.standard_normal((d, args.classes))
            t_full = best_ms(lambda: full_eigh(gram, b), args.repeats)
            t_tri = best_ms(lambda: eigh_projections(gram, b), args.repeats)
            w0, p0 = full_eigh(gram, b)
            w1, p1 = eigh_projections(gram, b)
            dw = np.max(np.abs(w1 - w0)) / w0[-1]
            dp = np.max(np.abs(p1 ** 2 - p0 ** 2)) / np.max(p0 ** 2)
            print(f"{d:5d} {t_full:16.3f} {t_tri:20.3f} {t_full / t_tri:6.2f} {dw:13.1e} {dp:16.1e}")


if __name__ == "__main__":
    main()
