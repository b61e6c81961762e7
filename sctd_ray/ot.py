"""Ground cost between label spaces and shared-kernel entropic OT (SPEC 1).

``ground_cost`` builds the (K, C) cost between a teacher's K classes and the target's C
classes; ``sinkhorn`` solves a whole batch of entropic OT problems that share that cost.

Solver form (docs/method.md, "Implementation notes"): Sinkhorn-Knopp in scaling form with one
kernel for the whole batch, shifted per column, ``Kc = exp((min_k M_kc - M_kc) / eps)``, and the
column scaling renormalised to peak at 1 every iteration. Each iteration is exactly two matrix
products, ``(B x K)(K x C)`` and ``(B x C)(C x K)``, plus elementwise work on ``B x K`` and
``B x C``; no log or exp inside the loop. The shifts make every sum bounded below by
``exp(-R)``, R = range(M)/eps (``_iterate_kernel``), which is the log-domain solver's
stability without its per-iteration ``exp``/``log``, as long as R stays under a dtype's limit
(50 in float32, 500 in float64): float32 problems past 50 are solved in float64, and past 500
an exact log-domain solver with log-sum-exp over ``(chunk, K, C)`` blocks of at most
``DENSE_CHUNK_ELEMS`` entries takes over (the only place a three-way tensor is built, apart
from ``return_plan=True``). The iteration order and start are POT's ``sinkhorn_knopp``, so a
run of n iterations matches ``ot.sinkhorn2(..., numItermax=n, stopThr=0)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from .errors import ScoreInputError

COOC_FLOOR = 1e-6            # cooc cost is clipped at -log(COOC_FLOOR)
CHECK_EVERY = 10             # iterations between convergence checks (each one syncs a GPU)
KERNEL_RANGE_LIMIT = {torch.float32: 50.0, torch.float64: 500.0}   # max range(M)/eps
DENSE_CHUNK_ELEMS = 1 << 22  # entries per (chunk, K, C) block of the exact fallback
CUDA_GRAPHS = True           # replay fixed-iteration prepared solves on CUDA from a graph
MAX_GRAPHS_PER_COST = 8      # captured shapes kept per prepared cost (a training run uses 1-2)
_NORM_FLOOR = 1e-12          # rows with a smaller norm count as zero vectors (cosine 0)


# --------------------------------------------------------------------------- helpers

def _is_torch(*xs) -> bool:
    return any(isinstance(x, torch.Tensor) for x in xs)


def _first_tensor(*xs) -> torch.Tensor | None:
    for x in xs:
        if isinstance(x, torch.Tensor):
            return x
    return None


def _as_tensor(x, name: str, device, dtype=None) -> torch.Tensor:
    if x is None:
        raise ScoreInputError(f"{name} is required")
    try:
        t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as e:
        raise ScoreInputError(f"{name} must be an array of numbers; got {type(x).__name__} ({e})")
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device=device)


def _float_dtype(*ts: torch.Tensor) -> torch.dtype:
    """float32 when every input is float32 (or narrower float), else float64."""
    if all(t.is_floating_point() and t.dtype != torch.float64 for t in ts):
        return torch.float32
    return torch.float64


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm; rows with norm < 1e-12 become zero (cosine 0 with anything)."""
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm > _NORM_FLOOR, x / norm.clamp_min(_NORM_FLOOR), torch.zeros_like(x))


def _check_labels(y: torch.Tensor, n: int, num_classes: int | None) -> tuple[torch.Tensor, int]:
    if y.ndim != 1 or y.shape[0] != n:
        raise ScoreInputError(f"labels must have shape ({n},); got {tuple(y.shape)}")
    if y.is_floating_point():
        if not bool(torch.all(y == torch.round(y))):
            raise ScoreInputError("labels must be integers; got non-integral floats")
    elif y.dtype == torch.bool or y.is_complex():
        raise ScoreInputError(f"labels must be integers; got dtype {y.dtype}")
    y = y.long()
    if n == 0:
        raise ScoreInputError("no samples: labels is empty")
    lo, hi = int(y.min()), int(y.max())
    c = hi + 1 if num_classes is None else int(num_classes)
    if lo < 0 or hi >= c:
        raise ScoreInputError(f"labels must lie in [0, {c}); got values from {lo} to {hi}")
    return y, c


def _empty_class_error(counts: torch.Tensor | np.ndarray) -> None:
    counts = np.asarray(counts.cpu() if isinstance(counts, torch.Tensor) else counts)
    empty = np.flatnonzero(counts <= 0)
    if empty.size:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if empty.size > 10 else "")
        raise ScoreInputError(f"every one of the {counts.size} target classes needs at least one "
                              f"sample; classes without samples: {shown}")


def _out(t: torch.Tensor, as_numpy: bool):
    return t.cpu().numpy() if as_numpy else t


# --------------------------------------------------------------------------- ground cost

def cost_from_prototypes(weight, class_sums, class_counts):
    """proto-cos cost (SPEC 1) from streaming statistics: ``M[k,c] = 1 - cos(w_k, mu_c)``.

    weight (K, D) teacher head rows; class_sums (C, D) sums of teacher features per target
    class; class_counts (C,) samples per class (each > 0, else ScoreInputError). Only the
    direction of ``mu_c`` matters, so the sums are used as they are. A zero row (norm < 1e-12)
    has cosine 0 with everything. Returns (K, C) numpy float64 for numpy input, else a tensor
    on weight's device in weight's floating dtype.
    """
    ref = _first_tensor(weight, class_sums, class_counts)
    device = ref.device if ref is not None else torch.device("cpu")
    w = _as_tensor(weight, "weight", device, torch.float64)
    s = _as_tensor(class_sums, "class_sums", device, torch.float64)
    n = _as_tensor(class_counts, "class_counts", device, torch.float64)
    if w.ndim != 2 or s.ndim != 2 or w.shape[1] != s.shape[1]:
        raise ScoreInputError(f"weight must be (K, D) and class_sums (C, D) with the same D; got "
                              f"{tuple(w.shape)} and {tuple(s.shape)}")
    if n.shape != (s.shape[0],):
        raise ScoreInputError(f"class_counts must have shape ({s.shape[0]},); got {tuple(n.shape)}")
    if not (torch.isfinite(w).all() and torch.isfinite(s).all()):
        raise ScoreInputError("weight and class_sums must be finite; got NaN or inf")
    _empty_class_error(n)
    m = (1.0 - _unit_rows(w) @ _unit_rows(s).T).clamp_(0.0, 2.0)
    if isinstance(weight, torch.Tensor):
        return m.to(weight.dtype if weight.is_floating_point() else torch.float64)
    return _out(m, not _is_torch(weight, class_sums, class_counts))


def cost_from_joint(joint):
    """cooc cost (SPEC 1) from LEEP's soft joint ``J`` (K, C), any positive scale.

    ``M[k,c] = -log max(P(c|k), 1e-6)`` with ``P(c|k) = J[k,c] / sum_c J[k,c]``; a teacher class
    that never receives mass gets the clip value everywhere.
    """
    ref = _first_tensor(joint)
    j = _as_tensor(joint, "joint", ref.device if ref is not None else "cpu", torch.float64)
    if j.ndim != 2 or not torch.isfinite(j).all() or bool((j < 0).any()):
        raise ScoreInputError(f"joint must be a finite, non-negative (K, C) array; got shape "
                              f"{tuple(j.shape)}")
    rows = j.sum(1, keepdim=True)
    cond = torch.where(rows > 0, j / rows.clamp_min(1e-300), torch.zeros_like(j))
    m = -torch.log(cond.clamp_min(COOC_FLOOR))
    if isinstance(joint, torch.Tensor):
        return m.to(joint.dtype if joint.is_floating_point() else torch.float64)
    return m.numpy()


def ground_cost(features, labels, weight, kind: str = "proto-cos", num_classes: int | None = None,
                probs=None):
    """Teacher-to-target ground cost M (K, C) (SPEC 1).

    ``proto-cos`` (default): ``1 - cos(w_k, mu_c)``, mu_c the mean of ``features`` (N, D) over
    samples with label c; ``weight`` is the teacher head (K, D). ``cooc``: ``-log P(c|k)`` from
    LEEP's soft joint of ``probs`` (N, K) and ``labels``, clipped at ``-log 1e-6`` (features and
    weight are then not used; weight may be None). C = ``num_classes`` or ``labels.max() + 1``;
    every class needs a sample. numpy in, numpy out; a tensor anywhere gives a tensor.
    """
    as_numpy = not _is_torch(features, labels, weight, probs)
    ref = _first_tensor(features, labels, weight, probs)
    device = ref.device if ref is not None else torch.device("cpu")
    y = _as_tensor(labels, "labels", device)
    if kind == "proto-cos":
        x = _as_tensor(features, "features", device, torch.float64)
        if x.ndim != 2:
            raise ScoreInputError(f"features must be (N, D); got shape {tuple(x.shape)}")
        y, c = _check_labels(y, x.shape[0], num_classes)
        sums = torch.zeros(c, x.shape[1], dtype=torch.float64, device=device).index_add_(0, y, x)
        counts = torch.bincount(y, minlength=c)
        m = cost_from_prototypes(_as_tensor(weight, "weight", device, torch.float64), sums, counts)
    elif kind == "cooc":
        p = _as_tensor(probs, "probs (needed by the cooc cost)", device, torch.float64)
        if p.ndim != 2:
            raise ScoreInputError(f"probs must be (N, K); got shape {tuple(p.shape)}")
        y, c = _check_labels(y, p.shape[0], num_classes)
        _empty_class_error(torch.bincount(y, minlength=c))
        joint = torch.zeros(p.shape[1], c, dtype=torch.float64, device=device)
        m = cost_from_joint(joint.index_add_(1, y, p.T))
    else:
        raise ScoreInputError(f"unknown ground cost kind {kind!r}; expected 'proto-cos' or 'cooc'")
    if as_numpy:
        return m.cpu().numpy()
    src = weight if kind == "proto-cos" else probs
    dt = src.dtype if isinstance(src, torch.Tensor) and src.is_floating_point() else torch.float64
    return m.to(dt)


# --------------------------------------------------------------------------- Sinkhorn

@dataclass
class SinkhornResult:
    """Batched entropic OT solution (SPEC 1). Shapes drop the batch axis for 1-D p and q.

    cost:  (B,) ``<plan_i, M>``, the linear cost of the entropic plan (what ``ot.sinkhorn2`` returns).
    value: (B,) ``<f_i, p_i> + <g_i, q_i>``: the dual objective, ``W_eps = <plan, M> - eps H(plan)``
           at convergence (a lower bound on it before).
    f, g:  (B, K), (B, C) dual potentials with ``plan = exp((f + g - M) / eps)``; ``g`` is centred
           so its mean over ``q``'s support is 0 (sum_c g = 0 for full-support q); entries where
           the mass is 0 are ``-inf``. ``g`` (+ any constant) is the gradient of ``W_eps`` w.r.t. q.
    plan:  (B, K, C) or None.
    n_iter: iterations run (each one g-update and one f-update).
    """

    cost: Any
    value: Any
    f: Any
    g: Any
    plan: Any | None
    n_iter: int


def sinkhorn(p, q, M, eps: float, max_iter: int = 100, tol: float = 1e-9,
             return_plan: bool = False) -> SinkhornResult:
    """Entropic OT ``W_eps(p_i, q_i; M)`` for a batch sharing one cost (SPEC 1).

    p (B, K) and q (B, C) are batches of distributions (rows are normalised to unit mass; zero
    entries are fine), or 1-D for a single problem (one may be 1-D and broadcast); M is (K, C).
    Stops after ``max_iter`` iterations or once the L1 violation of the column marginal is
    <= ``tol`` for every problem (checked every 10 iterations; ``tol=0`` never checks). numpy in,
    numpy out; tensors in, tensors out on the same device, float32 kept as float32.
    """
    as_numpy = not _is_torch(p, q, M)
    ref = _first_tensor(p, q, M)
    device = ref.device if ref is not None else torch.device("cpu")
    pt, qt = _as_tensor(p, "p", device), _as_tensor(q, "q", device)
    dtype = _float_dtype(pt, qt)
    pt, qt = pt.to(dtype), qt.to(dtype)
    mt = _as_tensor(M, "M", device, dtype)
    eps = _check_eps(eps)
    if int(max_iter) < 1 or not tol >= 0:
        raise ScoreInputError(f"need max_iter >= 1 and tol >= 0; got {max_iter!r}, {tol!r}")
    single = pt.ndim == 1 and qt.ndim == 1
    if mt.ndim != 2 or pt.ndim not in (1, 2) or qt.ndim not in (1, 2):
        raise ScoreInputError(f"expected p (B, K), q (B, C), M (K, C); got {tuple(pt.shape)}, "
                              f"{tuple(qt.shape)}, {tuple(mt.shape)}")
    pt, qt = pt.reshape(-1, pt.shape[-1]), qt.reshape(-1, qt.shape[-1])
    if pt.shape[0] != qt.shape[0]:
        if pt.shape[0] == 1:
            pt = pt.expand(qt.shape[0], -1)
        elif qt.shape[0] == 1:
            qt = qt.expand(pt.shape[0], -1)
    k, c = mt.shape
    if pt.shape[1] != k or qt.shape[1] != c or pt.shape[0] != qt.shape[0] or pt.shape[0] == 0:
        raise ScoreInputError(f"expected p (B, K), q (B, C), M (K, C) with the same B >= 1; got "
                              f"p {tuple(pt.shape)}, q {tuple(qt.shape)}, M {tuple(mt.shape)}")
    pt, qt = _normalise(pt, "p"), _normalise(qt, "q")
    work, backend = _work_dtype_and_backend(mt, eps, dtype)
    res = _solve(pt.to(work), qt.to(work), mt.to(work), float(eps), int(max_iter), float(tol),
                 return_plan, backend)

    def fin(t):
        if t is None:
            return None
        t = t.to(dtype)
        return _out(t[0] if single else t, as_numpy)

    return SinkhornResult(cost=fin(res.cost), value=fin(res.value), f=fin(res.f), g=fin(res.g),
                          plan=fin(res.plan), n_iter=res.n_iter)


def _work_dtype_and_backend(m: torch.Tensor, eps: float, dtype: torch.dtype):
    """The dtype and iteration a cost needs (module docstring): the kernel form while
    ``range(M)/eps`` is under the dtype's limit (float32 past 50 moves to float64), the exact
    log-domain form past float64's. Checks that M is finite (three host reads)."""
    if not bool(torch.isfinite(m).all()):
        raise ScoreInputError("M must be finite; got NaN or inf")
    spread = max(float((m.amax(1) - m.amin(1)).max()), float((m.amax(0) - m.amin(0)).max()))
    work = dtype
    if spread / eps > KERNEL_RANGE_LIMIT[work]:
        work = torch.float64
    backend = "kernel" if spread / eps <= KERNEL_RANGE_LIMIT[torch.float64] else "dense"
    return work, backend


@dataclass(frozen=True, eq=False)
class PreparedCost:
    """A cost M (K, C) and eps, checked once, with its Sinkhorn kernel built (``prepare_cost``).

    For a loop that solves many batches against one cost (SPEC 4's distillation loss): the
    per-call checks of ``sinkhorn`` (finite M, its range, the kernel's exp) are done once, and
    ``sinkhorn_prepared`` then reads nothing back to the host when ``tol == 0``.
    """

    m: torch.Tensor              # (K, C) in the working dtype, on the solving device
    eps: float
    backend: str                 # "kernel" or "dense" (module docstring)
    kernel: "_Kernel | None"     # the shared kernel when backend == "kernel"
    graphs: dict = field(default_factory=dict, repr=False)   # CUDA graphs of the solve, by shape

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.m.shape)


def prepare_cost(M, eps: float, dtype: torch.dtype = torch.float32,
                 device: str | torch.device | None = None) -> PreparedCost:
    """Check M (K, C) and eps once and build the shared kernel (SPEC 1) on ``device`` (M's
    device by default) for solves in ``dtype`` (float32 problems whose ``range(M)/eps`` exceeds
    50 are solved in float64, as in ``sinkhorn``)."""
    ref = _first_tensor(M)
    device = torch.device(device) if device is not None else (ref.device if ref is not None
                                                               else torch.device("cpu"))
    eps = _check_eps(eps)
    mt = _as_tensor(M, "M", device, torch.float64 if dtype == torch.float64 else torch.float32)
    if mt.ndim != 2:
        raise ScoreInputError(f"M must be (K, C); got shape {tuple(mt.shape)}")
    work, backend = _work_dtype_and_backend(mt, eps, mt.dtype)
    mt = mt.to(work)
    return PreparedCost(mt, eps, backend, _kernel(mt, eps) if backend == "kernel" else None)


def sinkhorn_prepared(p: torch.Tensor, q: torch.Tensor, cost: PreparedCost, max_iter: int,
                      tol: float = 0.0) -> SinkhornResult:
    """``sinkhorn`` for tensors p (B, K) and q (B, C) on the prepared cost's device (SPEC 1).

    Rows are normalised but not checked (non-negative with positive mass is the caller's
    promise, e.g. softmax outputs); shapes are. With ``tol == 0`` it runs exactly ``max_iter``
    iterations and never reads a value back to the host, so on a GPU it queues behind the
    student's forward without a synchronisation. Results in q's dtype, no plan.
    """
    k, c = cost.shape
    if p.ndim != 2 or q.ndim != 2 or p.shape[0] != q.shape[0] or p.shape[1] != k or q.shape[1] != c:
        raise ScoreInputError(f"expected p (B, {k}) and q (B, {c}) for a ({k}, {c}) cost; got "
                              f"p {tuple(p.shape)}, q {tuple(q.shape)}")
    if int(max_iter) < 1 or not tol >= 0:
        raise ScoreInputError(f"need max_iter >= 1 and tol >= 0; got {max_iter!r}, {tol!r}")
    if _graphable(p, q, cost, tol):
        return _graphed_solve(p, q, cost, int(max_iter))
    return _prepared_solve(p, q, cost, int(max_iter), float(tol))


def _prepared_solve(p, q, cost: PreparedCost, max_iter: int, tol: float) -> SinkhornResult:
    dtype, work = q.dtype, cost.m.dtype
    p, q = (p / p.sum(1, keepdim=True)).to(work), (q / q.sum(1, keepdim=True)).to(work)
    res = _solve(p, q, cost.m, cost.eps, max_iter, tol, False, cost.backend, cost.kernel)
    return SinkhornResult(cost=res.cost.to(dtype), value=res.value.to(dtype), f=res.f.to(dtype),
                          g=res.g.to(dtype), plan=None, n_iter=res.n_iter)


def _graphable(p, q, cost: PreparedCost, tol: float) -> bool:
    """A fixed-iteration solve on CUDA, outside autograd and outside another capture."""
    return (CUDA_GRAPHS and tol == 0 and cost.backend == "kernel" and q.is_cuda and p.is_cuda
            and not (torch.is_grad_enabled() and (p.requires_grad or q.requires_grad))
            and not torch.cuda.is_current_stream_capturing())


def _graphed_solve(p, q, cost: PreparedCost, max_iter: int) -> SinkhornResult:
    """``_prepared_solve`` replayed from a CUDA graph captured once per (shape, dtype, device,
    iterations): one launch instead of ~6 per iteration, which is what a small training step
    spends on the loss (docs/benchmarks.md). Same kernels, so the same values; results are
    copies, so a later solve does not overwrite them. Capturing synchronises the device once."""
    key = (tuple(p.shape), tuple(q.shape), p.dtype, q.dtype, p.device, max_iter)
    if key not in cost.graphs:
        if len(cost.graphs) >= MAX_GRAPHS_PER_COST:
            cost.graphs.pop(next(iter(cost.graphs)))
        cost.graphs[key] = _capture(p, q, cost, max_iter)
    entry = cost.graphs[key]
    if entry is None:   # capturing failed (e.g. another thread used the device meanwhile)
        return _prepared_solve(p, q, cost, max_iter, 0.0)
    graph, sp, sq, out = entry
    sp.copy_(p)
    sq.copy_(q)
    graph.replay()
    return SinkhornResult(cost=out.cost.clone(), value=out.value.clone(), f=out.f.clone(),
                          g=out.g.clone(), plan=None, n_iter=max_iter)


def _capture(p, q, cost: PreparedCost, max_iter: int):
    """(graph, static p, static q, static result) of one prepared solve, or None."""
    sp, sq = p.detach().clone(), q.detach().clone()
    side = torch.cuda.Stream(p.device)    # warm-up off the capture (cuBLAS workspaces)
    side.wait_stream(torch.cuda.current_stream(p.device))
    with torch.cuda.stream(side), torch.autocast("cuda", enabled=False):
        _prepared_solve(sp, sq, cost, max_iter, 0.0)
    torch.cuda.current_stream(p.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph), torch.autocast("cuda", enabled=False):
            out = _prepared_solve(sp, sq, cost, max_iter, 0.0)
    except RuntimeError:
        return None
    return graph, sp, sq, out


def _check_eps(eps) -> float:
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise ScoreInputError(f"eps must be a positive finite number; got {eps!r}") from None
    if not (np.isfinite(eps) and eps > 0):
        raise ScoreInputError(f"eps must be a positive finite number; got {eps!r}")
    return eps


def _normalise(x: torch.Tensor, name: str) -> torch.Tensor:
    sums = x.sum(1, keepdim=True)
    ok = torch.stack([torch.isfinite(x).all(), (x >= 0).all(), (sums > 0).all()]).tolist()
    if not all(ok):
        what = ["finite", "non-negative", "of positive total mass per row"]
        bad = [w for w, good in zip(what, ok) if not good]
        raise ScoreInputError(f"{name} must be finite, non-negative, with positive mass per row; "
                              f"got entries that are not {' / '.join(bad)}")
    return x / sums


def _solve(p, q, m, eps, max_iter, tol, return_plan, backend, kernel=None) -> SinkhornResult:
    """Sinkhorn on normalised (B, K), (B, C) batches; see the module docstring. ``kernel`` is
    M's shared kernel when already built (``prepare_cost``)."""
    if backend == "kernel":
        kernel = kernel if kernel is not None else _kernel(m, eps)
        f, g, cost, n_iter = _iterate_kernel(p, q, kernel, eps, max_iter, tol)
    else:
        f, g, cost, n_iter = _iterate_dense(p, q, m, eps, max_iter, tol)
    supp_q = q > 0
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    lam = torch.where(supp_q, g, zero).sum(1, keepdim=True) / supp_q.sum(1, keepdim=True)
    g, f = g - lam, f + lam
    value = torch.where(p > 0, f * p, zero).sum(1) + torch.where(supp_q, g * q, zero).sum(1)
    plan = torch.exp((f[:, :, None] + g[:, None, :] - m) / eps) if return_plan else None
    return SinkhornResult(cost=cost, value=value, f=f, g=g, plan=plan, n_iter=n_iter)


class _Kernel(NamedTuple):
    mcol: torch.Tensor   # (C,) min_k M_kc
    kc: torch.Tensor     # (K, C) exp((mcol - M) / eps)
    kc_t: torch.Tensor   # (C, K) its transpose, contiguous
    kcm_t: torch.Tensor  # (C, K) kc_t * M^T, for the transport cost


def _kernel(m: torch.Tensor, eps: float) -> _Kernel:
    mcol = m.amin(0)
    kc = torch.exp((mcol[None, :] - m) / eps)
    kc_t = kc.T.contiguous()
    return _Kernel(mcol, kc, kc_t, kc_t * m.T)


def _iterate_kernel(p, q, kern: _Kernel, eps, max_iter, tol):
    """Shared-kernel Sinkhorn in scaling form: ``plan = u_k Kc[k,c] w_c``.

    ``Kc = exp((min_k M_kc - M_kc)/eps)`` has every column peaking at 1, so all its entries are
    >= exp(-R), R = range(M)/eps; ``w`` is rescaled to peak at 1 (the plan does not change: ``u``
    absorbs the scale). Then ``w @ Kc^T >= exp(-R)``, ``u <= exp(R)`` and ``u @ Kc >= exp(-R)/(KC)``:
    below the dtype's limit on R nothing under- or overflows, with no log/exp inside the loop.
    Per iteration: ``w = q / (u @ Kc)``, ``u = p / (w @ Kc^T)`` (POT's v- then u-update, so the
    iterates are POT's up to scaling); the row marginal is exact at exit.
    """
    mcol, kc, kc_t, kcm_t = kern
    u = (p > 0).to(p.dtype)        # POT starts from ones; zero-mass rows stay out from the start
    w = None
    n_iter = 0
    for it in range(max_iter):
        s = u @ kc
        check = tol > 0 and w is not None and (it + 1) % CHECK_EVERY == 0
        if check:  # column marginal of the current plan (u, w) is s * w
            err = float((s * w - q).abs().sum(1).max())
        w = q / s
        w = w / w.amax(1, keepdim=True)
        u = p / (w @ kc_t)
        n_iter = it + 1
        if check and err <= tol:
            break
    cost = (u * (w @ kcm_t)).sum(1)
    f = eps * torch.log(u)
    g = eps * torch.log(w) + mcol
    return f, g, cost, n_iter


def _iterate_dense(p, q, m, eps, max_iter, tol):
    """Log-domain Sinkhorn with an exact log-sum-exp over (chunk, K, C) blocks.

    Used only when ``range(M)/eps`` exceeds even float64's kernel limit (e.g. cooc costs with a
    tiny eps); memory is bounded by ``DENSE_CHUNK_ELEMS`` entries per block.
    """
    chunk = max(1, DENSE_CHUNK_ELEMS // max(1, m.numel()))

    def blocks(x, fn):
        return torch.cat([fn(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])

    def lse_cols(f):   # eps * lse_k((f_bk - M_kc)/eps) -> (B, C)
        return blocks(f, lambda z: eps * torch.logsumexp((z[:, :, None] - m) / eps, 1))

    def lse_rows(g):   # eps * lse_c((g_bc - M_kc)/eps) -> (B, K)
        return blocks(g, lambda z: eps * torch.logsumexp((z[:, None, :] - m) / eps, 2))

    logp, logq = torch.log(p), torch.log(q)          # -inf where the mass is 0
    supp_q = q > 0
    f = torch.where(p > 0, 0.0, -torch.inf).to(p.dtype)
    g = None
    n_iter = 0
    for it in range(max_iter):
        g_new = eps * logq - lse_cols(f)
        check = tol > 0 and g is not None and (it + 1) % CHECK_EVERY == 0
        if check:  # column marginal of the plan (f, g) is q * exp((g - g_new)/eps)
            d = torch.where(supp_q, g - g_new, torch.zeros_like(g_new))
            err = float((q * torch.expm1(d / eps).abs()).sum(1).max())
        g = g_new
        f = eps * logp - lse_rows(g)
        n_iter = it + 1
        if check and err <= tol:
            break

    def cost_block(idx):
        plan = torch.exp((f[idx][:, :, None] + g[idx][:, None, :] - m) / eps)
        return (plan * m).sum((1, 2))

    cost = blocks(torch.arange(p.shape[0], device=p.device), cost_block)
    return f, g, cost, n_iter
