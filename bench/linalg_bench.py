"""The scores' CPU linear algebra, each route against the one it replaced, on one BLAS thread as
in ``TeacherStats.compute`` on CPU, measured in one run on N = 2000 synthetic post-ReLU features:

- LogME: ``metrics.eigh_projections`` (tridiagonal form, no eigenvectors of the Gram) vs a full
  eigendecomposition followed by ``V^T b``;
- TransRate's class Grams: ``metrics.gram_lower`` (BLAS syrk, lower triangle) vs ``z.T @ z``
  in torch, for --classes classes of N / C rows each;
- its log-determinants and H-score's factor: ``metrics.cholesky_lower`` (scipy's LAPACK potrf)
  vs ``torch.linalg.cholesky_ex``, on ``I + G / (n eps)``;
- TransRate's class rates and the global scatter: the batched route of a GPU (zero-padded class
  rows, one batched Cholesky) vs the per-class route the CPU keeps.

    python bench/linalg_bench.py [--dims 64,128,256,512] [--classes 10] [--torch-threads 2]

``--torch-threads 2`` gives the torch routes torch's own OpenMP threads (its MKL shares them,
so they do not fight torch's spinning workers as a threaded OpenBLAS does) while the scipy
routes stay on one BLAS thread: whether a second core pays at these sizes. It adds a row for
LogME by torch's full ``eigh`` (MKL).

Prints, per feature dimension D, the best of --repeats for both routes of each, their ratio and
the largest differences (relative to the largest entry or eigenvalue).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

import torch

from sctd_ray.metrics import cholesky_lower, eigh_projections, gram_lower


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


def torch_eigh(gram: torch.Tensor, b: torch.Tensor):
    w, v = torch.linalg.eigh(gram)
    return w, v.T @ b


def class_rate_routes(z: torch.Tensor, classes: int, repeats: int):
    """TransRate's class rates and the global scatter (``TeacherStats._scatter_and_class_rates``)
    by the batched route a GPU takes vs the per-class LAPACK route of the CPU, on the same rows."""
    from sctd_ray import stats as stats_mod

    n, d = z.shape
    y = torch.arange(n) % classes
    st = stats_mod.TeacherStats(classes, torch.zeros(2, d, dtype=torch.float64), metrics=("transrate",))
    st.update(z, torch.zeros(n, 2, dtype=torch.float64), y)
    counts, rows = st._counts.numpy(), torch.cat(st._tr_x)
    default = stats_mod._batched_class_rates
    out = {}
    try:
        for batched in (True, False):
            stats_mod._batched_class_rates = lambda device, b=batched: b
            out[batched] = (best_ms(lambda: st._scatter_and_class_rates(counts, rows), repeats),
                            st._scatter_and_class_rates(counts, rows)[2])
    finally:
        stats_mod._batched_class_rates = default
    diff = max(abs(a - b) / abs(b) for a, b in zip(out[True][1], out[False][1]))
    return out[True][0], out[False][0], diff


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="64,128,256,512")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch's threads for its routes (the scipy ones stay on one BLAS thread)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with threadpool_limits(limits=1, user_api="blas"):
        torch.set_num_threads(args.torch_threads)
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
            rows.append(("LogME eigh + V^T b | eigh_projections", d, t_full, t_tri, max(dw, dp)))
            if args.torch_threads > 1:
                gt, bt = torch.from_numpy(gram), torch.from_numpy(b)
                t_teigh = best_ms(lambda: torch_eigh(gt, bt), args.repeats)
                w2, p2 = (a.numpy() for a in torch_eigh(gt, bt))
                diff = max(np.max(np.abs(w2 - w0)) / w0[-1], np.max(np.abs(p2 ** 2 - p0 ** 2)) / np.max(p0 ** 2))
                rows.append((f"LogME torch eigh ({args.torch_threads} thr) | eigh_projections", d,
                             t_teigh, t_tri, diff))

            z = torch.from_numpy(f - f.mean(0))
            blocks = list(torch.chunk(z, args.classes))
            t_gemm = best_ms(lambda: [zk.T @ zk for zk in blocks], args.repeats)
            t_syrk = best_ms(lambda: [gram_lower(zk) for zk in blocks], args.repeats)
            g0, g1 = blocks[0].T @ blocks[0], gram_lower(blocks[0])
            dg = float((torch.tril(g1) - torch.tril(g0)).abs().max() / g0.abs().max())
            rows.append((f"{args.classes} class Grams torch | syrk", d, t_gemm, t_syrk, dg))

            m = (g0 / (len(blocks[0]) * 1e-4)).numpy()
            m[np.diag_indices(d)] += 1.0
            mt = torch.from_numpy(m)
            t_torch = best_ms(lambda: torch.linalg.cholesky_ex(mt), args.repeats)
            t_lapack = best_ms(lambda: cholesky_lower(m), args.repeats)
            l0, l1 = torch.linalg.cholesky_ex(mt)[0].numpy(), np.tril(cholesky_lower(m))
            rows.append(("Cholesky torch | potrf", d, t_torch, t_lapack,
                         float(np.abs(l1 - l0).max() / np.abs(l0).max())))
            rows.append(("class rates + S: batched | per class", d,
                         *class_rate_routes(z, args.classes, args.repeats)))
    print(f"threads: torch {torch.get_num_threads()}, scipy BLAS 1")
    print(f"{'routine: before | now':44s} {'D':>5s} {'before ms':>10s} {'now ms':>8s} {'ratio':>6s} "
          f"{'max rel diff':>13s}")
    for name, d, t0, t1, diff in sorted(rows, key=lambda r: (r[0], r[1])):
        print(f"{name:44s} {d:5d} {t0:10.3f} {t1:8.3f} {t0 / t1:6.2f} {diff:13.1e}")

if __name__ == "__main__":
    main()
