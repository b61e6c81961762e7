"""Improved OT-based scores of the ``sctd`` family (SPEC 2: new names; ``metrics.sctd`` and
``metrics.sctd_cost`` keep their definitions). Reasoning and benchmark numbers: docs/method.md,
"Improved score: sctd_fused", and the quality benchmark (SPEC 6, ``sctd bench quality``).

Notation (SPEC 1-2): ``p_i`` teacher prediction, ``M[k,c] = 1 - cos(w_k, mu_c)`` the proto-cos
cost, ``A = P M`` the closed-form cost of transporting ``p_i`` to the one-hot label ``e_c``.
``sctd`` is the log-likelihood of the labels under ``softmax(-A/T)`` with a fixed ``T = 0.1``.

``sctd_fused``: the transported measure is a mixture. Sample i is represented by
``nu_i = a * sum_k p_ik delta(w_k) + (1 - a) * delta(phi_i)``: mass ``a`` on the teacher's label
anchors as it predicts them (SPEC 2's route through the teacher's label space) and ``1 - a`` on
the sample's own feature point. With the same ground cost to the target prototypes,
``1 - cos(., mu_c)``, the one-hot transport of ``nu_i`` to ``e_c`` costs (closed form, SPEC 1)
``a A[i,c] + (1 - a) F[i,c]``, ``F[i,c] = 1 - cos(phi_i, mu_c)``. The score is SPEC 2's
``mean_i log softmax_c(-cost_i / T)[y_i]`` with ``(a, T)`` fitted by maximum likelihood
(equivalently ``beta_A, beta_F >= 0`` on ``-(beta_A A + beta_F F)``: concave, unique
maximum), reported as nats of label information, ``+ log C`` (0 = no information, log C = all).
Prototypes are leave-one-out: ``mu_c^{-i}`` excludes sample i, so with 5-20 shots a
prototype cannot explain its own sample.

``sctd_cal``: ablation: SPEC 2's costs ``A`` alone with the maximum-likelihood temperature
(no feature route, no leave-one-out).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import softmax

# scores of the benchmark only; ``sctd_fused`` is also one of ``metrics.NAMES`` (scans, streaming)
EXTRA_NAMES = ("sctd_cal", "sctd_fused")
# 1/T is fitted in [0, BETA_MAX]: T >= 0.01, a tenth of SPEC 2's default T. On targets whose
# costs separate the labels perfectly the likelihood keeps rising as T -> 0 and every such
# teacher would tie at log C; with the bound they are still ordered by their cost margins.
BETA_MAX = 100.0


def unit_rows(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 1e-12)


def loo_costs(h, features, labels, sums, w_unit=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out costs of SPEC 1-2 to every target label, (N, C) each, on the inputs'
    device in float64: ``A[i,c] = 1 - h_i . unit(mu_c^{-i})`` with ``h_i = sum_k p_ik unit(w_k)``
    (= ``sum_k p_ik M^{-i}[k,c]``: rows of P sum to 1) and ``F[i,c] = 1 - cos(phi_i, mu_c^{-i})``.
    ``sums`` (C, D) are the class feature sums ``S_c`` of all samples, and
    ``mu_c^{-i} = S_c - [y_i = c] phi_i`` (a scale of the prototype does not change a cosine).
    Every leave-one-out term is a correction of ``phi_i . S_c`` on the sample's own class.

    ``h`` holds the rows ``h_i`` (N, D), or, with ``w_unit`` (K, D) given, the rows ``p_i``
    (N, K): then ``h_i . S_c = p_i . (W_unit S_c)``, ``h_i . phi_i = p_i . (W_unit phi_i)`` and
    ``|h_i|^2 = p_i^T (W_unit W_unit^T) p_i``, and the N x D rows of h are never formed (less
    work for a small head and many samples: ``h_rows``). Shared by the in-memory score and
    ``stats.TeacherStats``."""
    t = lambda a: (a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))).double()  # noqa: E731
    h, x, s = t(h), t(features), t(sums)
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels,
                        device=x.device).long()
    n = y.shape[0]
    own = torch.arange(n, device=x.device), y
    xs = x @ s.T                                                      # phi_i . S_c
    xn = torch.linalg.vector_norm(x, dim=1)
    xx = xn * xn
    if w_unit is None:
        hs, hx, hn = h @ s.T, (h * x).sum(1), torch.linalg.vector_norm(h, dim=1)
    else:
        wu = t(w_unit).to(x.device)
        hs = h @ (wu @ s.T)                                           # h_i . S_c
        hx = ((x @ wu.T) * h).sum(1)                                  # h_i . phi_i
        hn = ((h @ (wu @ wu.T)) * h).sum(1).clamp_min(0).sqrt()       # |h_i|
    norms2 = (s * s).sum(1).expand(n, -1).clone()                     # |mu_c^{-i}|^2
    norms2[own] += xx - 2 * xs[own]
    xs[own] -= xx                                                     # phi_i . mu_c^{-i}
    hs[own] -= hx                                                     # h_i . mu_c^{-i}
    mu = norms2.clamp_min(0).sqrt()

    def cos(dots, vec_norm):
        den = mu * vec_norm[:, None]
        return torch.where(den > 1e-12, dots / den.clamp_min(1e-300), torch.zeros_like(dots))

    return 1 - cos(hs, hn) * hn[:, None], 1 - cos(xs, xn)


def cost_terms(features, probs, labels, weight, num_classes: int, loo: bool = True) -> dict[str, np.ndarray]:
    """Per-sample transport costs to every target label (N, C): ``A`` (SPEC 2, through the
    teacher's label space) and ``F`` (feature point mass to the prototype), with or without
    leave-one-out prototypes."""
    x = np.asarray(features, np.float64)
    y = np.asarray(labels, np.int64)
    p = np.asarray(probs, np.float64)
    wu = unit_rows(np.asarray(weight, np.float64))
    sums = np.zeros((num_classes, x.shape[1]))
    np.add.at(sums, y, x)
    if not loo:
        m = np.clip(1 - wu @ unit_rows(sums).T, 0, 2)
        return {"A": p @ m, "F": 1 - unit_rows(x) @ unit_rows(sums).T}
    # the clip of M at [0, 2] is a no-op for cosines
    h, wu = h_rows(p, wu, num_classes)
    a, f = loo_costs(h, x, y, sums, wu)
    return {"A": a.numpy(), "F": f.numpy()}


def _objective_numpy(costs: list[np.ndarray], labels):
    """``calibrated_loglik``'s objective with its gradient and Hessian, on the host."""
    y = np.asarray(labels, np.int64)
    n, c = costs[0].shape
    j = len(costs)
    z = np.stack([-np.asarray(a, np.float64) for a in costs])   # (J, N, C) logits per unit beta
    zy_mean = z[:, np.arange(n), y].mean(1)                       # (J,)
    z_flat = z.reshape(j, n * c)
    z_cols = np.ascontiguousarray(z_flat.T)
    z_max = np.abs(z_flat).max(1)
    ones = np.ones(c)                                             # row sums as products: fast

    def evaluate(beta):
        logits = (beta @ z_flat).reshape(n, c)
        if beta @ z_max < 600:                                    # exp cannot overflow
            e = np.exp(logits)
            s = e @ ones
            lse = np.log(s)
        else:
            top = logits.max(1, keepdims=True)
            e = np.exp(logits - top)
            s = e @ ones
            lse = np.log(s) + top[:, 0]
        val = float(beta @ zy_mean - lse.sum() / n)
        e *= (1.0 / s)[:, None]                                   # q, the softmax
        zq = z_flat * e.reshape(1, n * c)                         # z q, (J, N*C)
        ez = (zq.reshape(j * n, c) @ ones).reshape(j, n)          # E_q z per sample
        grad = zy_mean - ez.sum(1) / n
        cov = (zq @ z_cols - ez @ ez.T) / n                       # mean_i Cov_q(z_i)
        return val, grad, -cov
    return evaluate, n, c


def _objective_torch(costs: list, labels):
    """The same objective on the costs' device (float64); J numbers per call come back."""
    z = torch.stack([-a.double() for a in costs])                 # (J, N, C)
    j, n, c = z.shape
    y = torch.as_tensor(labels, device=z.device).long()
    zy_mean = z.gather(2, y.expand(j, n)[:, :, None])[:, :, 0].mean(1)   # (J,)

    def evaluate(beta):
        b = torch.from_numpy(np.asarray(beta, np.float64)).to(z.device)
        logits = torch.einsum("j,jnc->nc", b, z)
        lse = torch.logsumexp(logits, 1)
        q = torch.exp(logits - lse[:, None])
        zq = z * q
        ez = zq.sum(2)                                            # (J, N): E_q z per sample
        cov = (torch.einsum("jnc,knc->jk", zq, z) - ez @ ez.T) / n   # mean_i Cov_q(z_i)
        out = torch.cat([(b @ zy_mean - lse.mean())[None], zy_mean - ez.mean(1), -cov.reshape(-1)])
        out = out.cpu().numpy()
        return float(out[0]), out[1:1 + j], out[1 + j:].reshape(j, j)
    return evaluate, n, c


def calibrated_loglik(costs: list, labels) -> tuple[float, np.ndarray]:
    """max_{0 <= beta <= BETA_MAX} mean_i log softmax_c(-sum_j beta_j costs_j[i, :])[y_i] + log C,
    and beta. The objective is concave in beta (a log-likelihood of a linear softmax model) with
    gradient ``mean_i (z_iy - E_q z_i)`` and Hessian ``-mean_i Cov_q(z_i)``; with one or two
    betas a projected Newton ascent with backtracking reaches the maximum to rounding in a few
    steps (a general quasi-Newton solver spent more time in its own bookkeeping than here).
    Each trial point is evaluated once, with its derivatives (a full Newton step is almost
    always accepted), and the ascent stops once the Newton step promises < 1e-15 nats.
    Costs given as torch tensors (e.g. on a GPU) are evaluated there, in float64; only the
    value, gradient and Hessian (J numbers each) come back to the host."""
    if isinstance(costs[0], torch.Tensor):
        evaluate, n, c = _objective_torch(costs, labels)
    else:
        evaluate, n, c = _objective_numpy(costs, labels)
    beta = np.zeros(len(costs))
    val, grad, hess = evaluate(beta)
    for _ in range(100):
        free = ((beta > 0) | (grad > 0)) & ((beta < BETA_MAX) | (grad < 0))   # not held by a bound
        g = grad[free]
        if not g.size or np.abs(g).max() <= 1e-12:
            break
        step = np.zeros_like(beta)
        step[free] = _psd_solve(-hess[free][:, free], g)
        gain = grad @ step
        if not gain > 0:                                          # no curvature: plain ascent
            step = np.where(free, grad, 0.0)
        elif gain < 2e-15:                                        # Newton gain < 1e-15: done
            break
        t = 1.0
        for _ in range(60):
            cand = np.clip(beta + t * step, 0.0, BETA_MAX)
            cval, cgrad, chess = evaluate(cand)
            if cval >= val + 1e-4 * (grad @ (cand - beta)):
                break
            t /= 2
        else:
            break
        if (cand == beta).all():
            break
        beta, val, grad, hess = cand, cval, cgrad, chess
    return float(val + np.log(c)), beta


def _psd_solve(h: np.ndarray, g: np.ndarray, rcond: float = 1e-12) -> np.ndarray:
    """The minimum-norm least-squares solution of ``h x = g`` for a small symmetric ``h``, with
    eigenvalues at or below ``rcond`` of the largest counting as zero (``np.linalg.lstsq``'s
    rule; its SVD costs several times more for a 2 x 2 matrix). A well-conditioned 1 x 1 or
    2 x 2 system, the ascent's usual one, is solved in closed form."""
    if h.shape == (1, 1) and h[0, 0] != 0:
        return g / h[0, 0]
    if h.shape == (2, 2):
        a, b, c = float(h[0, 0]), float(h[0, 1]), float(h[1, 1])
        det, half_trace, r = a * c - b * b, abs(0.5 * (a + c)), float(np.hypot(0.5 * (a - c), b))
        if det > 0 and half_trace - r > 1e-8 * (half_trace + r):   # |eigenvalues| when det > 0
            return np.array([(c * g[0] - b * g[1]) / det, (a * g[1] - b * g[0]) / det])
    w, v = np.linalg.eigh(h)
    big = np.abs(w) > rcond * np.abs(w).max()
    return v[:, big] @ ((v[:, big].T @ g) / w[big])


def sctd_cal(features, probs, labels, weight, num_classes: int) -> float:
    """SPEC 2 costs ``A = P M`` with a maximum-likelihood temperature (nats of label info)."""
    t = cost_terms(features, probs, labels, weight, num_classes, loo=False)
    return calibrated_loglik([t["A"]], labels)[0]


def sctd_fused(features, probs, labels, weight, num_classes: int) -> float:
    """``A^loo`` and ``F^loo`` to the same prototypes, jointly calibrated (see module doc)."""
    t = cost_terms(features, probs, labels, weight, num_classes, loo=True)
    return calibrated_loglik([t["A"], t["F"]], labels)[0]


def h_rows(probs, w_unit, num_classes: int):
    """``loo_costs``'s first arguments, whichever costs fewer multiply-adds: the rows of P with
    ``W_unit`` (beyond the N K D both routes pay: ``W_unit W_unit^T``, K^2 D, and N K^2 for
    ``|h_i|``, then K D C + N K C for ``h_i . S_c``; cheap for a small teacher head and many
    samples), else ``h = P W_unit`` (then N D C for ``h_i . S_c``). A 1000-class teacher of
    2048 features on 100 samples: 2.2 G vs 1.4 M."""
    n, (k, d), c = probs.shape[0], w_unit.shape, num_classes
    rows_of_p = k * k * d + n * k * k + k * d * c + n * k * c < n * d * c + 2 * n * d
    return (probs, w_unit) if rows_of_p else (probs @ w_unit, None)


def fused_from_rows(h, features, labels, sums, w_unit=None) -> float:
    """``sctd_fused`` from per-sample rows (``h_i = P W_unit``, or ``p_i`` with ``w_unit``; see
    ``loo_costs``), features, labels and the class sums (what ``stats.TeacherStats`` keeps); the
    costs are built on the rows' device."""
    a, f = loo_costs(h, features, labels, sums, w_unit)
    if a.device.type != "cpu":   # the objective is evaluated where the costs are
        return calibrated_loglik([a, f], labels)[0]
    y = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return calibrated_loglik([a.numpy(), f.numpy()], y)[0]


SCORES = {"sctd_cal": sctd_cal, "sctd_fused": sctd_fused}


def compute_extra(features, logits, labels, weight, num_classes: int, names=EXTRA_NAMES,
                  tau_a: float = 1.0) -> dict[str, float]:
    """Every requested variant of one teacher on one target from its pre-logits, logits
    (``p_i = softmax(z_i / tau_a)``, SPEC 0) and head weight: {name: value}."""
    probs = softmax(np.asarray(logits, np.float64) / tau_a, axis=1)
    return {n: float(SCORES[n](features, probs, labels, weight, num_classes)) for n in names}
