"""Distillation losses across label spaces (SPEC 4) and the Hinton KD baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ScoreInputError
from ..ot import PreparedCost, sinkhorn, sinkhorn_prepared


class _EntropicOT(torch.autograd.Function):
    """``W_eps(p_i, q_i; M)`` per row, differentiable in q through the dual potential g.

    Envelope theorem: ``dW_eps/dq = g`` (up to a constant, which the softmax Jacobian removes),
    so backward needs no pass through the Sinkhorn iterations.
    """

    @staticmethod
    def forward(ctx, q, p, m, eps, max_iter, tol):
        if isinstance(m, PreparedCost):
            res = sinkhorn_prepared(p, q, m, max_iter, tol)
        else:
            res = sinkhorn(p, q, m, eps, max_iter=max_iter, tol=tol)
        # g is -inf only where q underflowed to 0; the softmax Jacobian multiplies that entry
        # by q = 0, so any finite value gives the right logit gradient.
        ctx.save_for_backward(torch.nan_to_num(res.g, neginf=0.0))
        return res.value

    @staticmethod
    def backward(ctx, grad_value):
        (g,) = ctx.saved_tensors
        return grad_value[:, None] * g, None, None, None, None, None


def ot_distill_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, M, tau: float,
                    eps: float, max_iter: int = 500, tol: float = 1e-6) -> torch.Tensor:
    """SPEC 4: ``mean_i W_eps(p_t_i, softmax(s_i / tau); M)``, a scalar tensor.

    ``W_eps`` is the full entropic objective ``<pi, M> - eps H(pi)`` (SPEC 1), whose gradient in
    the student distribution is the Sinkhorn potential g; autograd chains it through
    ``softmax(s / tau)``. ``teacher_probs`` (B, K) are detached; ``M`` is (K, C) for
    ``student_logits`` (B, C). Computed in float32 (float64 for float64 logits). The gradient is
    exact at convergence: Sinkhorn stops once every column marginal is within ``tol`` (L1) or
    after ``max_iter`` iterations (mixing slows down as eps / range(M) shrinks).

    In a training loop pass ``M`` as ``ot.prepare_cost(M, eps)`` (checked once, kernel built
    once) with ``tol=0``: the loss then runs exactly ``max_iter`` iterations and reads nothing
    back to the host, so on a GPU it never stalls the step (no synchronisation).
    """
    if student_logits.ndim != 2 or teacher_probs.ndim != 2:
        raise ScoreInputError(f"expected student_logits (B, C) and teacher_probs (B, K); got "
                              f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    q = torch.softmax(student_logits.to(dtype) / tau, dim=1)
    p = teacher_probs.detach().to(device=q.device, dtype=dtype)
    if isinstance(M, PreparedCost):
        if float(eps) != M.eps:
            raise ScoreInputError(f"eps {eps} differs from the prepared cost's eps {M.eps}")
        return _EntropicOT.apply(q, p, M, M.eps, int(max_iter), float(tol)).mean()
    m = torch.as_tensor(M).detach().to(device=q.device, dtype=dtype)
    return _EntropicOT.apply(q, p, m, float(eps), int(max_iter), float(tol)).mean()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Hinton KD: ``tau^2 * mean_i KL(softmax(t_i/tau) || softmax(s_i/tau))`` (same label space)."""
    if student_logits.shape != teacher_logits.shape:
        raise ScoreInputError(f"kd needs the same label space: student logits "
                              f"{tuple(student_logits.shape)} vs teacher logits "
                              f"{tuple(teacher_logits.shape)}")
    log_q = F.log_softmax(student_logits / tau, dim=1)
    log_p = F.log_softmax(teacher_logits.detach().to(log_q.dtype) / tau, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * tau * tau
