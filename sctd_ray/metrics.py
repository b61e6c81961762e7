"""Teacher assessment scores on in-memory arrays (SPEC 2-3); higher means more related.

Every public score takes numpy arrays or torch tensors and returns a Python float. Each one
first reduces its inputs to the sufficient statistics of SPEC 3 (soft joint, argmax-label
counts, class sums, feature Gram/scatter, per-sample teacher outputs) and then applies a
``*_from_*`` formula. ``stats.TeacherStats`` accumulates the same statistics batch by batch and
calls the same formulas, so streaming and in-memory scores agree to rounding.

Inputs: ``probs`` (N, K) teacher probabilities (rows on the simplex), ``labels`` (N,) integers
in [0, C), ``features`` (N, D) teacher pre-logits, ``weight`` (K, D) teacher head. C is
``num_classes`` or ``labels.max() + 1`` and every class needs a sample. Anything else raises
``ScoreInputError`` saying what was expected and what came; no score returns NaN.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from scipy.linalg import blas, lapack

from . import scores_extra
from .errors import ScoreInputError
from .ot import cost_from_prototypes

from .score_names import (DEFAULT_RANK_BY, FEATURE_SCORES, NAMES, PROB_SCORES,  # noqa: F401
                          WEIGHT_SCORES)

PROBS_SUM_ATOL = 1e-3          # tolerance on the row sums of probs
LOGME_MAX_ITER = 11            # authors' LogME.py: at most 11 fixed-point steps
LOGME_RTOL = 1e-3              # ... stopping at relative change of alpha/beta <= 1e-3
LOGME_DAMP = 1e-5              # ... and the 1e-5 in the alpha/beta denominators
LOGME_RANK_RTOL = 1e-12        # singular directions with s^2 <= 1e-12 s_max^2 count as null
HSCORE_RCOND = 1e-10           # pinv cutoff, relative to the largest eigenvalue of cov(f)
HSCORE_CERTIFY = HSCORE_RCOND  # Cholesky route when lambda_min / lambda_max is certified above
TRANSRATE_EPS = 1e-4


# --------------------------------------------------------------------------- validation

def _array(x, name: str, shape_doc: str) -> np.ndarray:
    """float64 numpy copy of a 2-D numpy/torch input, finite everywhere."""
    if x is None:
        raise ScoreInputError(f"{name} is required: expected an array of shape {shape_doc}")
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.double() if x.is_floating_point() else x
        x = x.numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "fiub":
        raise ScoreInputError(f"{name} must be numeric {shape_doc}; got dtype {a.dtype}")
    a = a.astype(np.float64)
    if a.ndim != 2:
        raise ScoreInputError(f"{name} must have shape {shape_doc}; got shape {a.shape}")
    bad = ~np.isfinite(a)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ScoreInputError(f"{name} must be finite; got {int(bad.sum())} NaN/inf entries "
                              f"(first at [{i}, {j}]: {a[i, j]})")
    return a


def _probs(probs) -> np.ndarray:
    p = _array(probs, "probs", "(N, K)")
    if (p < 0).any():
        raise ScoreInputError(f"probs must be non-negative; got minimum {p.min():.3g}")
    sums = p.sum(1)
    worst = int(np.argmax(np.abs(sums - 1.0))) if sums.size else 0
    if sums.size and abs(sums[worst] - 1.0) > PROBS_SUM_ATOL:
        raise ScoreInputError(f"probs rows must sum to 1 (softmax outputs, not logits); row {worst} "
                              f"sums to {sums[worst]:.6g}")
    return p


def _labels(labels, n: int, num_classes: int | None) -> tuple[np.ndarray, int]:
    """int64 labels of length n in [0, C), every class present; returns (labels, C)."""
    if labels is None:
        raise ScoreInputError(f"labels is required: expected integers of shape ({n},)")
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ScoreInputError(f"labels must have shape ({n},) to match the other inputs; got "
                              f"shape {y.shape}")
    if n == 0:
        raise ScoreInputError("no samples: got empty inputs")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ScoreInputError("labels must be integers; got non-integral or non-finite values")
    elif y.dtype.kind not in "iu":
        raise ScoreInputError(f"labels must be integers; got dtype {y.dtype}")
    y = y.astype(np.int64)
    lo, hi = int(y.min()), int(y.max())
    c = hi + 1 if num_classes is None else int(num_classes)
    if lo < 0 or hi >= c:
        raise ScoreInputError(f"labels must lie in [0, {c}); got values from {lo} to {hi}")
    counts = np.bincount(y, minlength=c)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if empty.size > 10 else "")
        raise ScoreInputError(f"every one of the {c} target classes needs at least one sample; "
                              f"classes without samples: {shown}")
    return y, c


def _check_rows(name: str, a: np.ndarray, n: int) -> None:
    if a.shape[0] != n:
        raise ScoreInputError(f"{name} has {a.shape[0]} rows but labels has {n} entries")


def _weight(weight, k: int | None, d: int) -> np.ndarray:
    w = _array(weight, "weight", "(K, D)")
    if w.shape[1] != d:
        raise ScoreInputError(f"weight must be (K, D) with D = {d} (the feature dimension); got "
                              f"shape {w.shape}")
    if k is not None and w.shape[0] != k:
        raise ScoreInputError(f"weight must have K = {k} rows (one per column of probs); got "
                              f"shape {w.shape}")
    return w


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not np.isfinite(value):
        raise ScoreInputError(f"{name} is not finite ({value}): the inputs are degenerate for "
                              f"this score")
    return value


# --------------------------------------------------------------------------- statistics

def class_sums(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(C, D) feature sums and (C,) counts per class."""
    sums = np.zeros((num_classes, features.shape[1]))
    np.add.at(sums, labels, features)
    return sums, np.bincount(labels, minlength=num_classes).astype(np.float64)


def soft_joint(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, C) unnormalised soft joint ``sum_i p_i e_{y_i}^T`` (SPEC 3, LEEP)."""
    onehot = np.zeros((labels.shape[0], num_classes))
    onehot[np.arange(labels.shape[0]), labels] = 1.0
    return probs.T @ onehot


def argmax_counts(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, C) counts of (argmax_k p_i, y_i) pairs (SPEC 3, NCE); ties go to the first index."""
    k = probs.shape[1]
    z = np.argmax(probs, axis=1)
    return np.bincount(z * num_classes + labels, minlength=k * num_classes).reshape(k, num_classes)


def _small_gram(z: np.ndarray) -> np.ndarray:
    """``z z^T`` or ``z^T z``, whichever is smaller: both have the same non-zero eigenvalues."""
    return z @ z.T if z.shape[0] < z.shape[1] else z.T @ z


# --------------------------------------------------------------------------- formulas

def sctd_from_costs(costs, labels, temperature: float) -> float:
    """SPEC 2 ``sctd``: mean_i log softmax_c(-A[i, :]/T)[y_i] from A = P M (N, C); numpy, or
    torch on its device (a GPU: only the mean comes back)."""
    if isinstance(costs, torch.Tensor):
        z = -costs.double() / temperature
        y = torch.as_tensor(labels, device=z.device).long()[:, None]
        return float((z.gather(1, y)[:, 0] - torch.logsumexp(z, 1)).mean())
    z = -costs / temperature
    top = z.max(1)
    lse = np.log(np.exp(z - top[:, None]) @ np.ones(z.shape[1])) + top   # row sums as a product
    return float(np.mean(z[np.arange(labels.shape[0]), labels] - lse))


def sctd_cost_from_joint(joint: np.ndarray, cost: np.ndarray, n: int) -> float:
    """SPEC 2 ``sctd_cost`` = -mean_i (P M)[i, y_i] = -<J, M> / N with J the soft joint sum."""
    return float(-np.sum(joint * cost) / n)


def leep_conditional(joint: np.ndarray) -> np.ndarray:
    """LEEP's P(c|k) = J[k,c] / sum_c J[k,c]; a teacher class with no mass in J never has mass
    in any p_i, so its (undefined) row is 0."""
    rows = joint.sum(1, keepdims=True)
    return np.divide(joint, rows, out=np.zeros_like(joint), where=rows > 0)


def leep_from_expected(eyz: np.ndarray) -> float:
    """LEEP from the expected empirical predictions of the true labels, (p_i^T P(.|.))[y_i]."""
    with np.errstate(divide="ignore"):
        return float(np.mean(np.log(eyz)))


def leep_from_joint(probs: np.ndarray, labels: np.ndarray, joint: np.ndarray) -> float:
    """SPEC 3 LEEP: mean_i log (p_i^T P(.|.))[y_i], P(c|k) = J[k,c] / sum_c J[k,c]."""
    eyz = (probs @ leep_conditional(joint))[np.arange(labels.shape[0]), labels]
    return leep_from_expected(eyz)


def nce_from_counts(counts: np.ndarray) -> float:
    """SPEC 3 NCE: -H(Y | Z) = sum_{z,y} P(z,y) log P(y|z) from the (K, C) count table."""
    pzy = counts / counts.sum()
    pz = np.broadcast_to(pzy.sum(1, keepdims=True), pzy.shape)
    nz = pzy > 0
    return float(np.sum(pzy[nz] * np.log(pzy[nz] / pz[nz])))


def sym_eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and vectors of a symmetric matrix, in float64 (LAPACK syevd:
    ~15% faster than torch's on 1 CPU thread)."""
    return np.linalg.eigh((matrix + matrix.T) / 2)


def eigh_projections(matrix, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) of a symmetric matrix A (D, D) and the projections ``V^T
    vectors`` (D, m) on its eigenvectors, in float64, for m << D.

    On the CPU (a numpy A) the eigenvectors of A are never formed: A = Q T Q^T with T
    tridiagonal (LAPACK sytrd), ``T = U diag(w) U^T`` (stevd), and ``V^T b = U^T (Q^T b)`` with Q
    applied as its Householder reflectors (ormqr). That skips an eigendecomposition's D x D
    back-transformation (``bench/linalg_bench.py``, one thread: 3.9 vs 5.4 ms at D = 256, 19 vs
    33 ms at D = 512; no gain below D ~ 100, where the full decomposition is used). A torch A
    is decomposed on its device (a GPU), and only the eigenvalues and the (D, m) projections
    come back to the host.
    """
    if isinstance(matrix, torch.Tensor):
        a = matrix.double()
        w, v = torch.linalg.eigh((a + a.T) / 2)
        b = torch.as_tensor(np.asarray(vectors, np.float64), device=a.device)
        return w.cpu().numpy(), (v.T @ b).cpu().numpy()
    d = matrix.shape[0]
    if d >= 96:   # below that the full decomposition is as fast (bench/linalg_bench.py)
        sym = (matrix + matrix.T) / 2   # its transpose is the same matrix, in LAPACK's order
        c, diag, off, tau, info = lapack.dsytrd(sym.T, lower=1, lwork=_sytrd_lwork(d), overwrite_a=1)
        if info == 0:
            w, u, info = lapack.dstevd(diag, off, compute_v=1)
        if info == 0:
            # Q = diag(1, Q'), Q' the reflectors below the subdiagonal in QR (geqrf) layout
            qb = np.array(vectors, np.float64)
            qb[1:] = torch.ormqr(torch.from_numpy(c[1:, :-1]), torch.from_numpy(tau),
                                 torch.from_numpy(qb[1:]), left=True, transpose=True).numpy()
            return w, u.T @ qb
    w, v = sym_eigh(matrix)
    return w, v.T @ vectors


@lru_cache(maxsize=64)
def _sytrd_lwork(d: int) -> int:
    """LAPACK's optimal workspace for sytrd (its blocked code: ~30% faster than the minimum)."""
    lwork, info = lapack.dsytrd_lwork(d, lower=1)
    return max(int(lwork), d) if info == 0 else d


def logme_from_gram(gram, sums: np.ndarray, counts: np.ndarray, n: int) -> float:
    """SPEC 3 LogME from the raw Gram ``F^T F`` (D, D; numpy, or torch on its device: see
    ``eigh_projections``), class sums (C, D) and counts (C,).

    The authors' ``LogME._fit_fixed_point`` (arXiv:2110.10545) on the eigendecomposition of the
    Gram (their ``truncated_svd`` branch, for every N): ``s^2`` the eigenvalues, ``u^T y_c =
    V^T sums_c / s``, ``||y_c||^2 = n_c``. Directions with ``s^2 <= 1e-12 s_max^2`` (round-off) are
    dropped; D stays the full feature dimension, as in their evidence formula.
    """
    d = gram.shape[0]
    lam, proj = eigh_projections(gram, sums.T)                   # proj (D, C): V^T sums_c
    lam, proj = lam[::-1], proj[::-1]
    keep = lam > max(lam[0] * LOGME_RANK_RTOL, 1e-20)
    sigma = lam[keep]                                             # squared singular values
    x = proj[keep] / np.sqrt(sigma)[:, None]                      # (k, C): u^T y_c
    return float(np.mean(_logme_evidences(sigma, np.ascontiguousarray(x.T), counts, n, d)))


def _logme_evidences(sigma: np.ndarray, x: np.ndarray, y2: np.ndarray, n: int, d: int) -> np.ndarray:
    """Maximum log-evidence per sample of each class (LogME.py, ``_fit_fixed_point`` loop),
    all classes at once: ``x`` (C, k) holds ``u^T y_c`` per row, ``y2`` (C,) ``||y_c||^2``; each
    class iterates until its own stopping rule holds, as the authors' per-class loop does."""
    x2 = x ** 2
    res_x2 = np.maximum(y2 - x2.sum(1), 0.0)  # |y|^2 outside the feature span; >= 0 but round-off
    c = x.shape[0]
    alpha, beta = np.ones(c), np.ones(c)
    m2, res2 = np.zeros(c), np.zeros(c)
    active = np.ones(c, dtype=bool)
    for _ in range(LOGME_MAX_ITER):
        t = (alpha / beta)[:, None]
        gamma_n = (sigma / (sigma + t)).sum(1)
        m2_n = (sigma * x2 / ((t + sigma) ** 2)).sum(1)
        res2_n = (x2 / ((1 + sigma / t) ** 2)).sum(1) + res_x2
        alpha_n = gamma_n / (m2_n + LOGME_DAMP)
        beta_n = (n - gamma_n) / (res2_n + LOGME_DAMP)
        alpha, beta = np.where(active, alpha_n, alpha), np.where(active, beta_n, beta)
        m2, res2 = np.where(active, m2_n, m2), np.where(active, res2_n, res2)
        active &= ~(np.abs(alpha_n / beta_n - t[:, 0]) / t[:, 0] <= LOGME_RTOL)
        if not active.any():
            break
    evidence = (d / 2.0 * np.log(alpha) + n / 2.0 * np.log(beta)
                - 0.5 * np.log(alpha[:, None] + beta[:, None] * sigma).sum(1)
                - beta / 2.0 * res2 - alpha / 2.0 * m2 - n / 2.0 * np.log(2 * np.pi))
    return evidence / n


def row_gram_route(n: int, d: int) -> bool:
    """Whether LogME, H-score and TransRate's total use the N x N Gram of the samples instead of
    the D x D one (fewer samples than features: few-shot targets of wide teachers). The non-zero
    eigenvalues are the same; an N x N decomposition costs (N / D)^3 of a D x D one."""
    return n < d


def class_eigen_projections(gram, labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) of a symmetric N x N Gram and ``Y^T U`` (C, N): each eigenvector
    summed over each class's rows, in float64 on the host. A torch Gram is decomposed on its
    device, ``labels`` (N,) a tensor there too; only the eigenvalues and (C, N) come back."""
    if isinstance(gram, torch.Tensor):
        g = gram.double()
        w, u = torch.linalg.eigh((g + g.T) / 2)
        proj = torch.zeros(num_classes, u.shape[1], dtype=u.dtype, device=u.device)
        proj.index_add_(0, labels.to(u.device), u)
        w, proj = w.cpu().numpy(), proj.cpu().numpy()
    else:
        w, u = sym_eigh(gram)
        proj = np.eye(num_classes)[np.asarray(labels)].T @ u
    return w[::-1], proj[:, ::-1]


def logme_from_row_gram(gram, labels, counts: np.ndarray, n: int, d: int) -> float:
    """SPEC 3 LogME from the N x N Gram ``F F^T`` of the raw features (``row_gram_route``;
    numpy, or torch on its device). This is the authors' own branch for N <= D, which takes
    ``F = U s V^T`` from F itself: ``s^2`` are the eigenvalues and ``u^T y_c`` each eigenvector's
    sum over class c's rows (``labels``: each row's class). Same rank cutoff and fixed point as
    ``logme_from_gram``; D stays the feature dimension."""
    lam, proj = class_eigen_projections(gram, labels, len(counts))
    keep = lam > max(lam[0] * LOGME_RANK_RTOL, 1e-20)
    return float(np.mean(_logme_evidences(lam[keep], np.ascontiguousarray(proj[:, keep]), counts, n, d)))


def hscore_from_row_gram(gram, labels, counts: np.ndarray) -> float:
    """SPEC 3 H-score from the N x N Gram ``Z Z^T`` of the centred features (``row_gram_route``;
    numpy, or torch on its device). With ``Z = U s V^T`` and ``d_c = Z^T y_c / n_c``, each term
    ``n_c d_c^T S^+ d_c`` of ``hscore_from_scatter`` is ``|U_k^T y_c|^2 / n_c`` over the kept
    directions k (the same pseudo-inverse cutoff, relative to the largest eigenvalue)."""
    w, proj = class_eigen_projections(gram, labels, len(counts))
    if w[0] <= 0:
        return 0.0                    # constant features
    keep = w > HSCORE_RCOND * w[0]
    return float(((proj[:, keep] ** 2).sum(1) / counts).sum())


def hscore_from_scatter(scatter, sums: np.ndarray, counts: np.ndarray, n: int,
                        eig: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """SPEC 3 H-score ``tr(pinv(cov f) cov E[f|y])`` from the centred scatter (D, D; numpy, or
    torch on its device, a GPU, where the whole computation stays).

    Covariances divide by N-1. The pseudo-inverse drops eigenvalues <= 1e-10 of the largest:
    the reference code's 1e-15 inverts round-off when D >= N, which makes the value depend on
    the summation order (in that regime the exact value is C - 1 for any data).

    ``cov E[f|y]`` is ``sum_c n_c d_c d_c^T / (N-1)`` with ``d_c = mu_c - mu``, so the value is
    ``sum_c n_c d_c^T S^+ d_c``. Without ``eig`` it is first computed from a Cholesky factor
    ``S = L L^T`` (``|L^-1 d_c|^2``, several times cheaper than an eigendecomposition), which is
    used only when it certifies that no eigenvalue is near the cutoff: ``1 / tr(S^-1) <=
    lambda_min`` and ``lambda_max <= tr(S)``, and their ratio is above ``HSCORE_CERTIFY``; then
    ``S^+ = S^-1``. Otherwise (rank-deficient or ill-conditioned features) the eigenvectors.
    """
    dev = sums / counts[:, None] - sums.sum(0) / n
    if isinstance(scatter, torch.Tensor):
        return _hscore_torch(scatter, dev, counts, n)
    if eig is None:
        value = _hscore_cholesky(scatter, dev, counts)
        if value is not None:
            return value
    cov_g = (dev.T * counts) @ dev / (n - 1)
    w, v = eig if eig is not None else sym_eigh(scatter)
    w = w / (n - 1)                   # eigenvalues of cov f = scatter / (N-1)
    if w[-1] <= 0:
        return 0.0                    # constant features: cov_g is 0 as well
    keep = w > HSCORE_RCOND * w[-1]
    vk = v[:, keep]
    return float(np.sum(((cov_g @ vk) * vk).sum(0) / w[keep]))


def _hscore_cholesky(scatter: np.ndarray, dev: np.ndarray, counts: np.ndarray) -> float | None:
    """``sum_c n_c |L^-1 d_c|^2`` when the certified condition bound allows it, else None."""
    chol = cholesky_lower(scatter)           # scatter is symmetric: its lower triangle is S
    if chol is None:
        return None
    linv, info = lapack.dtrtri(chol, lower=1, overwrite_c=1)
    linv = np.tril(linv)
    if info != 0 or not 1.0 / float(np.einsum("ij,ij->", linv, linv)) > \
            HSCORE_CERTIFY * float(np.trace(scatter)):
        return None
    proj = linv @ dev.T                                            # (D, C): L^-1 d_c
    return float(((proj * proj).sum(0) * counts).sum())


def _hscore_torch(scatter: torch.Tensor, dev: np.ndarray, counts: np.ndarray, n: int) -> float:
    """``hscore_from_scatter`` on the scatter's device, in float64: the same certified Cholesky
    route, else the eigenvectors; only scalars come back to the host."""
    s = scatter.double()
    s = (s + s.T) / 2
    d_t = torch.from_numpy(np.ascontiguousarray(dev.T)).to(s.device)          # (D, C)
    cnt = torch.from_numpy(np.asarray(counts, np.float64)).to(s.device)
    chol, info = torch.linalg.cholesky_ex(s)
    if int(info) == 0:
        eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
        linv = torch.linalg.solve_triangular(chol, eye, upper=False)
        if float(1.0 / (linv * linv).sum()) > HSCORE_CERTIFY * float(s.diagonal().sum()):
            proj = linv @ d_t                                                  # L^-1 d_c
            return float(((proj * proj).sum(0) * cnt).sum())
    w, v = torch.linalg.eigh(s)
    w = w / (n - 1)
    top = float(w[-1])
    if top <= 0:
        return 0.0
    keep = w > HSCORE_RCOND * top
    proj = v[:, keep].T @ d_t                                                  # (k, C): V^T d_c
    return float((((proj * proj) @ cnt) / (n - 1) / w[keep]).sum())


def cholesky_lower(a: np.ndarray, overwrite: bool = False) -> np.ndarray | None:
    """Lower Cholesky factor (upper triangle left as garbage) of the symmetric positive definite
    matrix whose lower triangle ``a`` holds, or None if it is not positive definite.

    LAPACK potrf of scipy's OpenBLAS: on one CPU thread faster than torch's
    (``bench/linalg_bench.py``: 1.1x at D = 256, 1.6x at D = 512, both including a copy).
    ``overwrite``: ``a`` may be destroyed (no copy then if it is float64 in Fortran order)."""
    a = np.asfortranarray(a, dtype=np.float64) if overwrite else np.array(a, np.float64, order="F")
    c, info = lapack.dpotrf(a, lower=1, clean=0, overwrite_a=1)
    return c if info == 0 else None


def gram_lower(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` (m, m) for x (n, m) in float64. On the CPU the lower triangle only (BLAS syrk:
    half a GEMM's work; the upper triangle is 0), elsewhere the full product."""
    if x.device.type != "cpu" or x.dtype != torch.float64:
        return x.T @ x
    a = x.numpy()
    if a.flags.c_contiguous:
        return torch.from_numpy(blas.dsyrk(1.0, a.T, trans=0, lower=1))   # a.T is Fortran-ordered
    return torch.from_numpy(blas.dsyrk(1.0, np.asfortranarray(a), trans=1, lower=1))


def symmetrise_lower(m: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle ``m`` holds."""
    return torch.tril(m) + torch.tril(m, -1).T


def coding_rate(gram: np.ndarray, n: int, eps: float = TRANSRATE_EPS) -> float:
    """``R = 1/2 logdet(I + Z^T Z / (n eps))`` from either Gram of the centred samples Z."""
    return 0.5 * logdet_identity_plus(torch.as_tensor(gram, dtype=torch.float64), 1.0 / (n * eps))


def logdet_identity_plus(gram: torch.Tensor, scale: float) -> float:
    """``logdet(I + scale * G)`` for a PSD Gram G (torch, any device) given by its lower
    triangle: a Cholesky factor of a matrix whose eigenvalues are all >= 1 (several times
    cheaper than an eigendecomposition; ``cholesky_lower`` on the CPU); eigenvalues of the
    symmetric matrix if round-off made the factorisation fail."""
    if gram.device.type == "cpu":
        def shifted():          # a fresh I + scale G, in G's memory order
            m = gram.double().numpy() * scale
            np.einsum("ii->i", m)[...] += 1.0       # the diagonal as a view
            return m
        chol = cholesky_lower(shifted(), overwrite=True)
        if chol is not None:
            return 2.0 * float(np.log(chol.diagonal()).sum())
        m = symmetrise_lower(torch.from_numpy(shifted()))
        ev = torch.linalg.eigvalsh(m).clamp_min(1.0)
        return float(torch.log(ev).sum())
    return float(logdet_identity_plus_batched(gram[None], scale)[0])   # on the device: one sync


def logdet_identity_plus_batched(grams: torch.Tensor, scales: torch.Tensor | float = 1.0) -> np.ndarray:
    """``logdet(I + scale_b * G_b)`` for a batch of PSD Grams (B, m, m) (torch, any device; lower
    triangles read), ``scales`` (B,) on the same device or one number: one batched Cholesky and
    one host sync for the whole batch; eigenvalues for any matrix whose factorisation failed."""
    m = grams * (scales[:, None, None] if isinstance(scales, torch.Tensor) else scales)
    m.diagonal(dim1=-2, dim2=-1).add_(1.0)
    chol, info = torch.linalg.cholesky_ex(m)
    logdet = 2.0 * torch.log(chol.diagonal(dim1=-2, dim2=-1)).sum(-1)
    host = torch.cat([logdet, info.to(logdet.dtype)]).cpu().numpy()   # the one sync
    out, failed = host[:len(m)].copy(), np.flatnonzero(host[len(m):])
    for b in failed.tolist():
        ev = torch.linalg.eigvalsh(symmetrise_lower(m[b])).clamp_min(1.0)
        out[b] = float(torch.log(ev).sum())
    return out


# --------------------------------------------------------------------------- public scores

def sctd(probs, labels, features, weight, temperature: float = 0.1,
         num_classes: int | None = None) -> float:
    """SPEC 2 ``sctd``: how well transport costs ``A = P M`` single out the right target label."""
    return compute_all(probs, labels, features, weight, names=("sctd",), num_classes=num_classes,
                       temperature=temperature)["sctd"]


def sctd_cost(probs, labels, features, weight, num_classes: int | None = None) -> float:
    """SPEC 2 ``sctd_cost``: minus the mean cost of transporting p_i to its label, -mean A[i, y_i]."""
    return compute_all(probs, labels, features, weight, names=("sctd_cost",),
                       num_classes=num_classes)["sctd_cost"]


def sctd_fused(probs, labels, features, weight, num_classes: int | None = None) -> float:
    """``sctd_fused`` (SPEC 2 variant; docs/method.md "Improved score"): the transported measure
    mixes the teacher's label anchors (as it predicts them) with the sample's own feature point;
    leave-one-out prototypes, mixture weight and temperature fitted by maximum likelihood.
    Nats of label information in [0, log C]. Formula: ``scores_extra``."""
    return compute_all(probs, labels, features, weight, names=("sctd_fused",),
                       num_classes=num_classes)["sctd_fused"]


def leep(probs, labels, num_classes: int | None = None) -> float:
    """SPEC 3 LEEP (Nguyen et al., 2020)."""
    return compute_all(probs, labels, None, None, names=("leep",), num_classes=num_classes)["leep"]


def nce(probs, labels, num_classes: int | None = None) -> float:
    """SPEC 3 NCE (Tran et al., 2019) with Z = argmax p_i."""
    return compute_all(probs, labels, None, None, names=("nce",), num_classes=num_classes)["nce"]


def logme(features, labels, num_classes: int | None = None) -> float:
    """SPEC 3 LogME (You et al.), fixed-point version of arXiv:2110.10545."""
    return compute_all(None, labels, features, None, names=("logme",),
                       num_classes=num_classes)["logme"]


def hscore(features, labels, num_classes: int | None = None) -> float:
    """SPEC 3 H-score (Bao et al., 2019)."""
    return compute_all(None, labels, features, None, names=("hscore",),
                       num_classes=num_classes)["hscore"]


def transrate(features, labels, eps: float = TRANSRATE_EPS, num_classes: int | None = None) -> float:
    """SPEC 3 TransRate (Huang et al., 2022): ``R(f) - (1/C) sum_c R(f_c)``.

    Features are centred once, globally; as in the authors' code each class term uses its own
    sample count, ``R(f_c) = 1/2 logdet(I + f_c^T f_c / (n_c eps))``, on those globally centred
    features (not re-centred per class).
    """
    return compute_all(None, labels, features, None, names=("transrate",),
                       num_classes=num_classes, transrate_eps=eps)["transrate"]


def compute_all(probs, labels, features, weight, names=NAMES, num_classes: int | None = None,
                temperature: float = 0.1, transrate_eps: float = TRANSRATE_EPS) -> dict[str, float]:
    """Several scores of one teacher at once, {name: value} in the order of ``names``.

    Inputs that no requested score needs may be None.
    """
    names = tuple(names)
    unknown = [m for m in names if m not in NAMES]
    if unknown or not names:
        raise ScoreInputError(f"unknown score name(s) {unknown or names}; expected some of {NAMES}")
    want = set(names)
    p = x = w = None
    n = None
    if want & PROB_SCORES:
        p = _probs(probs)
        n = p.shape[0]
    if want & FEATURE_SCORES:
        x = _array(features, "features", "(N, D)")
        if n is not None and x.shape[0] != n:
            raise ScoreInputError(f"features has {x.shape[0]} rows but probs has {n}")
        n = x.shape[0]
    y, c = _labels(labels, n, num_classes)
    if want & WEIGHT_SCORES:
        w = _weight(weight, p.shape[1], x.shape[1])
    if want & {"hscore", "transrate", "logme"} and n < 2:
        raise ScoreInputError(f"feature scores need at least 2 samples; got {n}")

    out: dict[str, float] = {}
    sums = counts = joint = cost = scatter = None
    if x is not None:
        sums, counts = class_sums(x, y, c)
    if want & {"sctd_cost", "leep"}:
        joint = soft_joint(p, y, c)
    if want & WEIGHT_SCORES:
        cost = cost_from_prototypes(w, sums, counts)
    rows = x is not None and row_gram_route(n, x.shape[1])   # N x N Grams (few-shot, wide)
    if want & {"hscore", "transrate"}:
        z = x - x.mean(0)
        scatter = z.T @ z if "hscore" in want and not rows else None
    for name in names:
        if name == "sctd":
            v = sctd_from_costs(p @ cost, y, temperature)
        elif name == "sctd_cost":
            v = sctd_cost_from_joint(joint, cost, n)
        elif name == "sctd_fused":
            h, wu = scores_extra.h_rows(p, scores_extra.unit_rows(w), c)
            v = scores_extra.fused_from_rows(h, x, y, sums, wu)
        elif name == "leep":
            v = leep_from_joint(p, y, joint)
        elif name == "nce":
            v = nce_from_counts(argmax_counts(p, y, c))
        elif name == "logme":
            v = (logme_from_row_gram(x @ x.T, y, counts, n, x.shape[1]) if rows else
                 logme_from_gram(x.T @ x, sums, counts, n))
        elif name == "hscore":
            v = hscore_from_row_gram(z @ z.T, y, counts) if rows else \
                hscore_from_scatter(scatter, sums, counts, n)
        else:  # transrate
            total = coding_rate(_small_gram(z), n, transrate_eps)
            per_class = [coding_rate(_small_gram(z[y == k]), int(counts[k]), transrate_eps)
                         for k in range(c)]
            v = total - float(np.mean(per_class))
        out[name] = _finite(name, v)
    return out
