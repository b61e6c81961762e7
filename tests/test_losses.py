"""Distillation losses (SPEC 4): value against POT, gradient against finite differences."""

import numpy as np
import ot as pot
import pytest
import torch
import torch.nn.functional as F

from sctd_ray.distill.losses import kd_loss, ot_distill_loss
from sctd_ray.errors import ScoreInputError
from sctd_ray.ot import prepare_cost

TIGHT = {"max_iter": 20000, "tol": 1e-14}


def problem(b=3, k=5, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, c, generator=g, dtype=torch.float64)
    teacher = torch.softmax(torch.randn(b, k, generator=g, dtype=torch.float64), 1)
    m = 2 * torch.rand(k, c, generator=g, dtype=torch.float64)
    return student, teacher, m


def test_value_is_the_entropic_ot_objective_of_pot():
    """W_eps = <pi, M> - eps H(pi) of POT's plan, averaged over the batch; the linear part of the
    same plan is what ot.sinkhorn2 reports."""
    student, teacher, m = problem()
    tau, eps = 2.0, 0.1
    loss = ot_distill_loss(student, teacher, m, tau, eps, **TIGHT)
    q = torch.softmax(student / tau, 1).numpy()
    values = []
    for i in range(3):
        plan = pot.sinkhorn(teacher[i].numpy(), q[i], m.numpy(), eps, numItermax=100000, stopThr=1e-15)
        linear = pot.sinkhorn2(teacher[i].numpy(), q[i], m.numpy(), eps, numItermax=100000, stopThr=1e-15)
        assert float((plan * m.numpy()).sum()) == pytest.approx(float(linear), rel=1e-12)
        values.append(float(linear) + eps * float((plan * np.log(plan)).sum()))
    assert loss.item() == pytest.approx(np.mean(values), rel=1e-10)


def test_gradient_equals_finite_differences():
    student, teacher, m = problem(seed=1)
    tau, eps, h = 1.5, 0.1, 1e-5
    s = student.clone().requires_grad_(True)
    ot_distill_loss(s, teacher, m, tau, eps, **TIGHT).backward()
    fd = torch.zeros_like(student)
    for i, j in np.ndindex(*student.shape):
        e = torch.zeros_like(student)
        e[i, j] = h
        fd[i, j] = (ot_distill_loss(student + e, teacher, m, tau, eps, **TIGHT)
                    - ot_distill_loss(student - e, teacher, m, tau, eps, **TIGHT)) / (2 * h)
    assert s.grad.abs().max() > 1e-3
    torch.testing.assert_close(s.grad, fd, rtol=1e-6, atol=1e-9)


def test_gradient_vanishes_at_the_transported_teacher_marginal():
    """min_q W_eps(p, q) drops the column constraint: the optimal plan is p_k softmax_c(-M_k/eps),
    whose column marginal q* = p^T softmax(-M/eps) is the minimiser. There g is constant, so the
    gradient w.r.t. the logits s = tau log q* is 0. (With K == C, zero diagonal and eps -> 0,
    q* -> p: the familiar "student equals teacher" case.)"""
    _, teacher, m = problem(seed=2, k=4, c=4)
    m.fill_diagonal_(0.0)
    tau, eps = 2.0, 0.1
    q_star = teacher @ torch.softmax(-m / eps, 1)
    s = (tau * torch.log(q_star)).requires_grad_(True)
    ot_distill_loss(s, teacher, m, tau, eps, **TIGHT).backward()
    torch.testing.assert_close(s.grad, torch.zeros_like(s), rtol=0, atol=1e-10)
    nudged = (tau * torch.log(q_star) + 0.3 * torch.randn_like(q_star)).requires_grad_(True)
    ot_distill_loss(nudged, teacher, m, tau, eps, **TIGHT).backward()
    assert nudged.grad.abs().max() > 1e-3


def test_teacher_gets_no_gradient_and_float32_works():
    student, teacher, m = problem(seed=3)
    s = student.float().requires_grad_(True)
    t = teacher.float().requires_grad_(True)
    loss = ot_distill_loss(s, t, m.float(), 2.0, 0.1)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    loss.backward()
    assert t.grad is None and torch.isfinite(s.grad).all()
    ref = ot_distill_loss(student, teacher, m, 2.0, 0.1, **TIGHT)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)


def test_saturated_student_gives_finite_gradients():
    """q underflows to exactly 0 for very confident logits; the gradient stays finite."""
    student, teacher, m = problem(seed=4)
    s = (student * 1e3).float().requires_grad_(True)
    ot_distill_loss(s, teacher.float(), m.float(), 1.0, 0.1).backward()
    assert torch.isfinite(s.grad).all()


def test_prepared_cost_gives_the_same_loss_and_gradient_without_reading_back(no_host_reads):
    """The training loop's form (SPEC 4): cost prepared once, fixed iterations, tol=0; it equals
    the checked form and never reads a value back to the host (a GPU sync per step)."""
    student, teacher, m = problem(b=6, k=7, c=5, seed=7)
    a = student.clone().requires_grad_(True)
    b = student.clone().requires_grad_(True)
    cost = prepare_cost(m, 0.1, dtype=torch.float64)
    with no_host_reads():
        ot_distill_loss(a, teacher, cost, 2.0, 0.1, max_iter=20, tol=0.0).backward()
    with no_host_reads(), pytest.raises(AssertionError, match="read back"):  # per-call checks read
        ot_distill_loss(b, teacher, m, 2.0, 0.1, max_iter=20, tol=0.0)
    assert a.grad is not None and a.grad.shape == a.shape


def test_prepared_cost_loss_equals_the_checked_loss():
    student, teacher, m = problem(b=6, k=7, c=5, seed=7)
    a = student.clone().requires_grad_(True)
    b = student.clone().requires_grad_(True)
    la = ot_distill_loss(a, teacher, prepare_cost(m, 0.1, dtype=torch.float64), 2.0, 0.1,
                         max_iter=20, tol=0.0)
    lb = ot_distill_loss(b, teacher, m, 2.0, 0.1, max_iter=20, tol=0.0)
    la.backward()
    lb.backward()
    assert la.item() == lb.item()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    with pytest.raises(ScoreInputError, match="eps"):
        ot_distill_loss(a, teacher, prepare_cost(m, 0.1), 2.0, 0.2)


def test_kd_loss_is_scaled_kl():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, generator=g, dtype=torch.float64)
    tau = 3.0
    p = torch.softmax(t / tau, 1)
    q = torch.softmax(s / tau, 1)
    expected = tau ** 2 * (p * (p.log() - q.log())).sum(1).mean()
    loss = kd_loss(s, t, tau)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    loss.backward()
    torch.testing.assert_close(s.grad, tau * (q - p).detach() / 4)   # d/ds of tau^2 KL, batch mean
    assert kd_loss(t, t, tau).item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="same label space"):
        kd_loss(s, t[:, :5], tau)


def test_kd_matches_torch_reference():
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    ref = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    assert kd_loss(s, t, 2.0).item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_loss_and_gradient_match_cpu():
    student, teacher, m = problem(seed=6)
    s_cpu = student.clone().requires_grad_(True)
    s_gpu = student.cuda().requires_grad_(True)
    ot_distill_loss(s_cpu, teacher, m, 2.0, 0.1, **TIGHT).backward()
    ot_distill_loss(s_gpu, teacher.cuda(), m.cuda(), 2.0, 0.1, **TIGHT).backward()
    torch.testing.assert_close(s_gpu.grad.cpu(), s_cpu.grad, rtol=1e-8, atol=1e-10)
