"""Why a CPU teacher's finalise stays on one thread (``TeacherStats.compute``), measured in one run.

Three questions, each answered by timing both sides in the same process:

1. Which host linear-algebra calls release the GIL? Two Python threads each run the call
   ``--calls`` times vs one thread running it twice as often (speedup ~2 on 2 free cores if the
   call releases the GIL, ~1 if it holds it): scipy's BLAS ``dsyrk`` and LAPACK ``dpotrf``
   (the CPU routes of TransRate and H-score), numpy's ``eigh`` and matmul, torch's matmul.
2. Do two lanes help right after a forward pass? A demo teacher's forward, then ``sctd_fused``
   (``scores_extra.fused_from_rows``) and TransRate's class terms (class Grams, their sum and
   one Cholesky log-determinant per class, by GIL-releasing numpy calls), one after the other
   vs on two threads, with torch on 2 threads and on 1.
3. torch's MKL on its 2 OpenMP threads (the ones still spinning after the forward) vs scipy's
   OpenBLAS on one thread, for the class Grams and LogME's eigendecomposition, alone and
   inside the whole finalise (``TeacherStats.compute``, every score, with those two routines
   swapped for their MKL versions in this process only), each timed right after a forward batch.

    python bench/finalise_lanes_bench.py --zoo DEMO_ZOO [--teacher fm-tops-effnet] [--repeats 11]

Prints medians in ms and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np
import torch
from scipy.linalg import blas, lapack
from threadpoolctl import threadpool_limits

from sctd_ray import metrics, scores_extra


def median_ms(fn, repeats: int, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def gil_table(calls: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    a = rng.random((2000, 256))
    g = np.asfortranarray(a.T @ a)
    ta = torch.from_numpy(a)
    ops = {"scipy dsyrk 2000x256": lambda: blas.dsyrk(1.0, a.T, trans=0, lower=1),
           "scipy dpotrf 256": lambda: lapack.dpotrf(g, lower=1, clean=0),
           "numpy eigh 256": lambda: np.linalg.eigh(g),
           "numpy matmul 2000x256": lambda: a.T @ a,
           "torch matmul 2000x256 (1 thread)": lambda: ta.T @ ta}
    print(f"1. GIL: {calls} calls on each of two threads vs {2 * calls} on one (median of {repeats})")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, op in ops.items():
            def serial():
                for _ in range(2 * calls):
                    op()

            def two():
                lanes = [threading.Thread(target=lambda: [op() for _ in range(calls)]) for _ in range(2)]
                for t in lanes:
                    t.start()
                for t in lanes:
                    t.join()
            s, p = median_ms(serial, repeats), median_ms(two, repeats)
            print(f"   {name:34s} one thread {s:8.1f}  two threads {p:8.1f}  speedup {s / p:5.2f}")
    finally:
        torch.set_num_threads(threads)


def class_terms(blocks: list[np.ndarray], eps: float = metrics.TRANSRATE_EPS):
    """TransRate's class Grams, their sum and per-class log-determinants, by numpy calls that
    release the GIL (the product's CPU route uses scipy's syrk and potrf, which do not)."""
    d = blocks[0].shape[1]
    scat, rates = np.zeros((d, d)), []
    for zk in blocks:
        gram = zk.T @ zk
        scat += gram
        m = gram * (1.0 / (len(zk) * eps))
        np.einsum("ii->i", m)[...] += 1.0
        rates.append(np.log(np.diagonal(np.linalg.cholesky(m))).sum())
    return scat, rates


def lanes_table(teacher, images, labels, classes: int, repeats: int) -> None:
    from sctd_ray.assess.engine import TeacherRunner

    runner = TeacherRunner(teacher, "cpu")
    feats, logits = [], []
    for i in range(0, len(labels), 256):
        f, z = runner.forward(torch.as_tensor(images[i:i + 256]))
        feats.append(f.double())
        logits.append(z.double())
    x, y = torch.cat(feats), torch.as_tensor(labels)
    p = torch.softmax(torch.cat(logits), 1)
    w_unit = runner.weight.double() / runner.weight.double().norm(dim=1, keepdim=True)
    sums = torch.zeros(classes, x.shape[1], dtype=torch.float64).index_add_(0, y, x)
    h, wu = scores_extra.h_rows(p, w_unit, classes)
    order = np.argsort(labels, kind="stable")
    z = x.numpy()[order] - x.numpy().mean(0)
    counts = np.bincount(labels, minlength=classes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    blocks = [np.ascontiguousarray(z[s:s + n]) for s, n in zip(starts, counts)]
    first = torch.as_tensor(images[:256])

    def fused():
        scores_extra.fused_from_rows(h, x, y, sums, wu)

    def one_after_other():
        fused()
        class_terms(blocks)

    def two_lanes():
        lane = threading.Thread(target=class_terms, args=(blocks,))
        lane.start()
        fused()
        lane.join()

    print(f"2. two lanes right after a forward pass ({teacher.teacher_id}, D = {x.shape[1]}, "
          f"N = {len(labels)}; median of {repeats}, each after one forward batch)")
    threads = torch.get_num_threads()
    try:
        for n in sorted({threads, 1}, reverse=True):
            def forward_then_set(n=n):
                torch.set_num_threads(threads)
                runner.forward(first)
                torch.set_num_threads(n)
            seq = median_ms(one_after_other, repeats, forward_then_set)
            par = median_ms(two_lanes, repeats, forward_then_set)
            print(f"   torch threads {n}: one after the other {seq:6.2f}  two lanes {par:6.2f}  "
                  f"speedup {seq / par:5.2f}")
    finally:
        torch.set_num_threads(threads)

    gram = x.numpy().T @ x.numpy()
    tgram = torch.from_numpy(gram)
    b = sums.numpy().T
    tblocks = [torch.from_numpy(blk) for blk in blocks]
    after = lambda: runner.forward(first)  # noqa: E731
    rows = [("class Grams", lambda: [metrics.gram_lower(t) for t in tblocks],
             lambda: [t.T @ t for t in tblocks]),
            ("LogME eigendecomposition + V^T b", lambda: metrics.eigh_projections(gram, b),
             lambda: (lambda w, v: (w, v.T @ torch.from_numpy(b)))(*torch.linalg.eigh(tgram)))]
    print(f"3. torch (MKL, {threads} threads) vs scipy's OpenBLAS on one thread, right after a forward batch")
    for name, openblas, mkl in rows:
        a, m = median_ms(openblas, repeats, after), median_ms(mkl, repeats, after)
        print(f"   {name:34s} OpenBLAS {a:6.2f}  MKL {m:6.2f}  ratio {a / m:5.2f}")

    from sctd_ray.stats import TeacherStats

    def finalise():
        st = TeacherStats(classes, runner.weight.double())
        for i in range(0, len(labels), 256):
            st.update(x[i:i + 256], torch.cat(logits)[i:i + 256], y[i:i + 256])
        after()
        t0 = time.perf_counter()
        st.compute()
        return time.perf_counter() - t0

    def mkl_eigh_projections(matrix, vectors):
        w, v = torch.linalg.eigh(torch.as_tensor(matrix))
        return w.numpy(), (v.T @ torch.as_tensor(np.asarray(vectors))).numpy()

    shipped = (metrics.gram_lower, metrics.eigh_projections)
    swapped = (lambda t: t.T @ t, mkl_eigh_projections)
    spent = {"shipped": [], "MKL": []}
    try:
        for _ in range(repeats):
            for name, routes in (("shipped", shipped), ("MKL", swapped)):
                metrics.gram_lower, metrics.eigh_projections = routes
                spent[name].append(finalise())
    finally:
        metrics.gram_lower, metrics.eigh_projections = shipped
    a, m = (1e3 * statistics.median(spent[k]) for k in ("shipped", "MKL"))
    print(f"   {'whole finalise, all scores':34s} OpenBLAS {a:6.2f}  MKL {m:6.2f}  ratio {a / m:5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", required=True, help="a demo zoo (sctd zoo build-demo DIR)")
    ap.add_argument("--teacher", default="fm-tops-effnet")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=11)
    args = ap.parse_args()

    from sctd_ray.data.sources import fashion_mnist
    from sctd_ray.zoo.loading import load_teacher
    from sctd_ray.zoo.store import open_store

    torch.set_grad_enabled(False)
    src = fashion_mnist("test")
    images = np.ascontiguousarray(src.images[:args.samples])
    labels = (src.labels[:args.samples] % args.classes).astype(np.int64)
    teacher = load_teacher(open_store(args.zoo), args.teacher)
    print(f"torch threads {torch.get_num_threads()}; scipy/numpy BLAS limited to one thread as in "
          f"TeacherStats.compute")
    with threadpool_limits(1, "blas"):
        gil_table(args.calls, max(3, args.repeats // 3))
        lanes_table(teacher, images, labels, args.classes, args.repeats)


if __name__ == "__main__":
    main()
