"""Benchmark: batched shared-kernel Sinkhorn (sctd_ray.ot.sinkhorn) vs a loop of POT's ot.sinkhorn2.

Both run exactly the same number of iterations (ours: tol=0; POT: numItermax=n, stopThr=0)
on the same problems, so the values must agree (<= 1e-6 relative in float64) and the time
ratio is the speed-up of batching. On a CPU both sides use one core by default (``--threads``).
Prints a table; run from the repository root:

    python bench/ot_bench.py                          # CPU, float64, the two comparison cases
    python bench/ot_bench.py --device cuda            # our solver on the GPU (POT stays on CPU)
    python bench/ot_bench.py --device cuda --big      # our solver alone, B=16384, K=1000, C=200
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    import ot as pot
except ImportError:          # e.g. a bare GPU box: time our solver alone
    pot = None

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sctd_ray.ot import sinkhorn  # noqa: E402

COMPARE = [(1024, 100, 10), (256, 1000, 100)]
BIG = (16384, 1000, 200)


def make_problem(b: int, k: int, c: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(k, 0.5), b)
    q = rng.dirichlet(np.full(c, 0.5), b)
    m = rng.uniform(0.0, 2.0, (k, c))            # proto-cos costs lie in [0, 2]
    return p, q, m


def time_ours(p, q, m, eps, iters, device, dtype, repeat):
    args = [torch.as_tensor(a, dtype=dtype, device=device) for a in (p, q, m)]

    def run():
        res = sinkhorn(*args, eps, max_iter=iters, tol=0.0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return res

    res = run()                                   # warm-up (kernels, allocator)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = run()
        times.append(time.perf_counter() - t0)
    assert res.n_iter == iters
    return min(times), statistics.median(times), res.cost.double().cpu().numpy()


def time_pot(p, q, m, eps, iters):
    t0 = time.perf_counter()
    out = np.array([pot.sinkhorn2(p[i], q[i], m, eps, numItermax=iters, stopThr=0.0)
                    for i in range(p.shape[0])])
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] for our solver (POT: CPU)")
    ap.add_argument("--dtype", choices=["float64", "float32"], default=None,
                    help="our solver's dtype (default float64; float32 with --big)")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5, help="timed runs of our solver (best is used)")
    ap.add_argument("--big", action="store_true",
                    help=f"time only our solver on B,K,C={BIG} (meant for a GPU)")
    ap.add_argument("--no-pot", action="store_true", help="skip the POT loop (ours only)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for our solver (default 1, like the POT loop, and steady "
                         "on a busy machine; 0 = torch's default)")
    a = ap.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here", file=sys.stderr)
        return 2
    dtype = getattr(torch, a.dtype or ("float32" if a.big else "float64"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    load = " load %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    print(f"device: {name}; torch threads {torch.get_num_threads()};{load}; torch {torch.__version__}, "
          f"POT {pot.__version__ if pot else 'not installed (ours only)'}; dtype {str(dtype).split('.')[-1]}; eps {a.eps}; {a.iters} iterations")
    rtol = 1e-6 if dtype == torch.float64 else 1e-4

    if a.big:
        if device.type != "cuda":
            print("note: --big on a CPU is slow (minutes)", file=sys.stderr)
        b, k, c = BIG
        p, q, m = make_problem(b, k, c)
        best, med, cost = time_ours(p, q, m, a.eps, a.iters, device, dtype, a.repeat)
        print(f"{'B':>6} {'K':>5} {'C':>4} {'ours best [ms]':>15} {'ours median [ms]':>17} {'finite':>7}")
        print(f"{b:6d} {k:5d} {c:4d} {best * 1e3:15.1f} {med * 1e3:17.1f} {str(np.isfinite(cost).all()):>7}")
        return 0

    print(f"{'B':>6} {'K':>5} {'C':>4} {'ours [ms]':>10} {'POT loop [ms]':>14} {'speed-up':>9} "
          f"{'max rel diff':>13} {'check':>6}")
    ok = True
    for b, k, c in COMPARE:
        p, q, m = make_problem(b, k, c)
        best, _, cost = time_ours(p, q, m, a.eps, a.iters, device, dtype, a.repeat)
        if a.no_pot or pot is None:
            print(f"{b:6d} {k:5d} {c:4d} {best * 1e3:10.1f}")
            continue
        t_pot, ref = time_pot(p, q, m, a.eps, a.iters)
        rel = float(np.max(np.abs(cost - ref) / np.abs(ref)))
        good = rel <= rtol
        ok &= good
        print(f"{b:6d} {k:5d} {c:4d} {best * 1e3:10.1f} {t_pot * 1e3:14.1f} {t_pot / best:8.1f}x "
              f"{rel:13.2e} {'ok' if good else 'FAIL':>6}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
