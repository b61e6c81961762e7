"""Ground cost and shared-kernel Sinkhorn (SPEC 1) against closed forms and POT."""

import math

import numpy as np
import ot as pot
import pytest
import torch

from sctd_ray.errors import ScoreInputError
from sctd_ray.ot import (SinkhornResult, _solve, cost_from_joint, cost_from_prototypes,
                         ground_cost, prepare_cost, sinkhorn, sinkhorn_prepared)


def problems(b, k, c, seed=0, spread=2.0):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(k), b)
    q = rng.dirichlet(np.ones(c), b)
    m = rng.uniform(0.0, spread, (k, c))
    return p, q, m


def entropic_value(plan, m, eps):
    """<plan, M> - eps H(plan), H = -sum plan log plan (0 log 0 = 0)."""
    nz = plan > 0
    return float((plan * m).sum() + eps * (plan[nz] * np.log(plan[nz])).sum())


# --------------------------------------------------------------------------- Sinkhorn

def test_same_iterates_as_pot_for_a_fixed_number_of_iterations():
    p, q, m = problems(6, 9, 4)
    res = sinkhorn(p, q, m, 0.1, max_iter=100, tol=0)
    ref = [pot.sinkhorn2(p[i], q[i], m, 0.1, numItermax=100, stopThr=0) for i in range(6)]
    assert res.n_iter == 100
    np.testing.assert_allclose(res.cost, ref, rtol=1e-12)
    short = sinkhorn(p, q, m, 0.1, max_iter=3, tol=0)
    ref3 = [pot.sinkhorn2(p[i], q[i], m, 0.1, numItermax=3, stopThr=0) for i in range(6)]
    np.testing.assert_allclose(short.cost, ref3, rtol=1e-12)


def test_converged_plan_cost_and_value_match_pot():
    p, q, m = problems(5, 7, 6, seed=1)
    eps = 0.05
    res = sinkhorn(p, q, m, eps, max_iter=5000, tol=1e-13, return_plan=True)
    assert res.n_iter < 5000
    np.testing.assert_allclose(res.plan.sum(2), p, atol=1e-12)
    np.testing.assert_allclose(res.plan.sum(1), q, atol=1e-12)
    for i in range(5):
        plan = pot.sinkhorn(p[i], q[i], m, eps, numItermax=100000, stopThr=1e-15)
        np.testing.assert_allclose(res.plan[i], plan, atol=1e-10)
        assert res.cost[i] == pytest.approx(float((plan * m).sum()), rel=1e-10)
        assert res.value[i] == pytest.approx(entropic_value(plan, m, eps), rel=1e-10)


def test_value_is_a_dual_lower_bound_before_convergence():
    p, q, m = problems(8, 10, 5, seed=2)
    exact = sinkhorn(p, q, m, 0.02, max_iter=20000, tol=1e-13).value
    early = sinkhorn(p, q, m, 0.02, max_iter=5, tol=0).value
    assert np.all(early <= exact + 1e-12)


def test_potentials_give_the_plan_and_g_is_centred():
    p, q, m = problems(4, 6, 5, seed=3)
    eps = 0.1
    res = sinkhorn(p, q, m, eps, max_iter=3000, tol=1e-13, return_plan=True)
    np.testing.assert_allclose(np.exp((res.f[:, :, None] + res.g[:, None, :] - m) / eps), res.plan,
                               atol=1e-14)
    np.testing.assert_allclose(res.g.sum(1), 0.0, atol=1e-12)
    np.testing.assert_allclose(res.value, (res.f * p).sum(1) + (res.g * q).sum(1), rtol=1e-12)


def test_g_is_the_gradient_of_the_value_in_q():
    """Directional derivative of W_eps along e_a - e_b (stays on the simplex) is g_a - g_b."""
    p, q, m = problems(1, 6, 4, seed=4)
    eps, h = 0.1, 1e-6

    def w(qq):
        return sinkhorn(p, qq, m, eps, max_iter=20000, tol=1e-14).value[0]

    g = sinkhorn(p, q, m, eps, max_iter=20000, tol=1e-14).g[0]
    for a, b in [(0, 1), (2, 3), (1, 3)]:
        d = np.zeros(4)
        d[a], d[b] = 1.0, -1.0
        fd = (w(q + h * d) - w(q - h * d)) / (2 * h)
        assert fd == pytest.approx(g[a] - g[b], abs=1e-7)


def test_small_eps_is_stable_in_float64_and_float32():
    """eps = 0.01 with M in [0, 2]: exp(-M/eps) reaches e^-200, below float32's range."""
    p, q, m = problems(6, 8, 5, seed=5)
    eps = 0.01
    ref = [pot.sinkhorn2(p[i], q[i], m, eps, method="sinkhorn_log", numItermax=50000,
                         stopThr=1e-14) for i in range(6)]
    r64 = sinkhorn(p, q, m, eps, max_iter=20000, tol=1e-12, return_plan=True)
    np.testing.assert_allclose(r64.cost, ref, rtol=1e-9)
    np.testing.assert_allclose(r64.plan.sum(2), p, atol=1e-12)
    r32 = sinkhorn(*(torch.tensor(a, dtype=torch.float32) for a in (p, q, m)), eps,
                   max_iter=20000, tol=1e-6)
    assert r32.cost.dtype == torch.float32
    assert torch.isfinite(r32.f).all() and torch.isfinite(r32.g).all()
    np.testing.assert_allclose(r32.cost.numpy(), ref, rtol=1e-4)


def test_one_hot_target_has_the_closed_form_for_every_eps():
    """q = e_c admits one coupling, p e_c^T: cost (p^T M)_c and W_eps = cost + eps sum p log p."""
    p, _, m = problems(5, 7, 4, seed=6)
    p[0, :3] = 0.0                       # zero teacher mass too
    p /= p.sum(1, keepdims=True)
    q = np.zeros((5, 4))
    q[:, 2] = 1.0
    for eps in (0.005, 0.01, 0.1, 1.0):
        res = sinkhorn(p, q, m, eps)
        np.testing.assert_allclose(res.cost, (p @ m)[:, 2], rtol=1e-12)
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(1)
        np.testing.assert_allclose(res.value, (p @ m)[:, 2] + eps * plogp, rtol=1e-10, atol=1e-12)
        assert np.all(np.isneginf(res.g[:, [0, 1, 3]])) and np.all(res.g[:, 2] == 0.0)


def test_zero_mass_entries_equal_the_problem_on_the_support():
    """Zero-mass rows/columns carry no plan: the result is POT's on the reduced problem
    (POT itself divides by zero on them)."""
    p, q, m = problems(4, 6, 5, seed=7)
    p[:, 1] = 0.0
    q[:, 0] = 0.0
    p /= p.sum(1, keepdims=True)
    q /= q.sum(1, keepdims=True)
    res = sinkhorn(p, q, m, 0.1, max_iter=100, tol=0)
    ref = [pot.sinkhorn2(np.delete(p[i], 1), q[i, 1:], np.delete(m, 1, 0)[:, 1:], 0.1,
                         numItermax=100, stopThr=0) for i in range(4)]
    np.testing.assert_allclose(res.cost, ref, rtol=1e-12)
    assert np.all(np.isneginf(res.f[:, 1])) and np.all(np.isneginf(res.g[:, 0]))
    assert np.all(np.isfinite(res.value))


def test_tiny_eps_uses_exact_blocks_and_approaches_emd(monkeypatch):
    """range(M)/eps ~ 1000 exceeds float64's kernel limit: the chunked log-domain path runs."""
    import sctd_ray.ot as sot
    calls = []
    dense = sot._iterate_dense
    monkeypatch.setattr(sot, "_iterate_dense", lambda *a: calls.append(1) or dense(*a))
    p, q, m = problems(4, 6, 5, seed=8)
    eps = 2e-3
    res = sinkhorn(p, q, m, eps, max_iter=50000, tol=1e-10)
    assert calls
    assert res.n_iter < 50000
    emd = np.array([pot.emd2(p[i], q[i], m) for i in range(4)])
    assert np.all(res.cost >= emd - 1e-8)
    np.testing.assert_allclose(res.cost, emd, atol=eps * math.log(6 * 5) + 1e-6)


def test_kernel_and_dense_backends_agree():
    p, q, m = problems(7, 9, 6, seed=9)
    args = [torch.from_numpy(a) for a in (p, q, m)]
    a = _solve(*args, 0.05, 300, 0.0, True, "kernel")
    b = _solve(*args, 0.05, 300, 0.0, True, "dense")
    for x, y in [(a.cost, b.cost), (a.value, b.value), (a.f, b.f), (a.g, b.g), (a.plan, b.plan)]:
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_input_and_output_kinds():
    p, q, m = problems(3, 5, 4, seed=10)
    res = sinkhorn(p, q, m, 0.1)
    assert isinstance(res, SinkhornResult) and isinstance(res.cost, np.ndarray)
    assert res.f.shape == (3, 5) and res.g.shape == (3, 4) and res.plan is None
    t = sinkhorn(torch.from_numpy(p).float(), torch.from_numpy(q).float(), m, 0.1)
    assert isinstance(t.cost, torch.Tensor) and t.cost.dtype == torch.float32
    single = sinkhorn(p[0], q[0], m, 0.1, return_plan=True)
    assert single.cost.shape == () and single.f.shape == (5,) and single.plan.shape == (5, 4)
    assert single.cost == pytest.approx(res.cost[0], rel=1e-12)
    bcast = sinkhorn(p[0], q, m, 0.1)                 # one teacher distribution, many targets
    np.testing.assert_allclose(bcast.cost[0], res.cost[0], rtol=1e-8)
    unnormalised = sinkhorn(3 * p, q, m, 0.1)
    np.testing.assert_allclose(unnormalised.cost, res.cost, rtol=1e-12)


@pytest.mark.parametrize("p_shape,q_shape,m_shape", [((3, 5), (3, 4), (5, 3)), ((3, 5), (2, 4), (5, 4)),
                                                     ((3, 5, 1), (3, 4), (5, 4))])
def test_shape_mismatch_is_reported(p_shape, q_shape, m_shape):
    with pytest.raises(ScoreInputError, match="expected p"):
        sinkhorn(np.ones(p_shape), np.ones(q_shape), np.ones(m_shape), 0.1)


def test_bad_values_are_reported():
    p, q, m = problems(2, 3, 3)
    bad = p.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ScoreInputError, match="finite"):
        sinkhorn(bad, q, m, 0.1)
    with pytest.raises(ScoreInputError, match="non-negative"):
        sinkhorn(p - 0.5, q, m, 0.1)
    with pytest.raises(ScoreInputError, match="eps"):
        sinkhorn(p, q, m, 0.0)
    with pytest.raises(ScoreInputError, match="M must be finite"):
        sinkhorn(p, q, np.full((3, 3), np.inf), 0.1)


@pytest.mark.parametrize("dtype,eps,spread", [(torch.float64, 0.1, 2.0), (torch.float32, 0.1, 2.0),
                                              (torch.float32, 0.05, 4.0),   # range/eps 80: float64 kernel
                                              (torch.float64, 0.002, 2.0)])  # 1000: exact blocks
def test_prepared_cost_gives_the_same_solution(dtype, eps, spread):
    p, q, m = (torch.from_numpy(a).to(dtype) for a in problems(6, 7, 5, seed=12, spread=spread))
    ref = sinkhorn(p, q, m, eps, max_iter=30, tol=0)
    cost = prepare_cost(m, eps, dtype=dtype)
    assert cost.backend == ("dense" if spread / eps > 500 else "kernel")
    assert cost.m.dtype == (torch.float64 if spread / eps > 50 else dtype)
    got = sinkhorn_prepared(p, q, cost, max_iter=30)
    assert got.n_iter == 30 and got.cost.dtype == dtype and got.plan is None
    for a, b in [(got.cost, ref.cost), (got.value, ref.value), (got.f, ref.f), (got.g, ref.g)]:
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    scaled = sinkhorn_prepared(3 * p, q, cost, max_iter=30)       # rows are normalised
    torch.testing.assert_close(scaled.cost, ref.cost)
    conv = sinkhorn_prepared(p, q, cost, max_iter=10000, tol=1e-5)  # tol still stops it early
    assert conv.n_iter < 10000 or cost.backend == "dense"


def test_prepared_cost_solves_without_reading_back(no_host_reads):
    p, q, m = (torch.from_numpy(a) for a in problems(4, 6, 3, seed=13))
    cost = prepare_cost(m, 0.1, dtype=torch.float64)
    with no_host_reads():
        res = sinkhorn_prepared(p, q, cost, max_iter=25)
    assert res.n_iter == 25
    with no_host_reads(), pytest.raises(AssertionError, match="read back"):  # the checked one reads
        sinkhorn(p, q, m, 0.1, max_iter=25, tol=0)


def test_prepared_cost_checks_once_and_reports_bad_input():
    p, q, m = problems(2, 3, 4)
    with pytest.raises(ScoreInputError, match="M must be finite"):
        prepare_cost(np.full((3, 4), np.nan), 0.1)
    with pytest.raises(ScoreInputError, match="eps"):
        prepare_cost(m, -1.0)
    with pytest.raises(ScoreInputError, match="M must be"):
        prepare_cost(np.ones(3), 0.1)
    cost = prepare_cost(m, 0.1)
    with pytest.raises(ScoreInputError, match=r"expected p \(B, 3\) and q \(B, 4\)"):
        sinkhorn_prepared(torch.from_numpy(p).float(), torch.ones(2, 3), cost, 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    p, q, m = problems(64, 50, 10, seed=11)
    cpu = sinkhorn(p, q, m, 0.1, max_iter=200, tol=0)
    gpu = sinkhorn(*(torch.from_numpy(a).cuda() for a in (p, q, m)), 0.1, max_iter=200, tol=0)
    assert gpu.cost.device.type == "cuda"
    np.testing.assert_allclose(gpu.cost.cpu().numpy(), cpu.cost, rtol=1e-10)


# --------------------------------------------------------------------------- ground cost

def test_proto_cos_hand_example():
    weight = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    feats = np.array([[2.0, 0.0], [0.0, 1.0], [4.0, 0.0], [0.0, 3.0]])
    labels = np.array([0, 1, 0, 1])              # mu_0 = (3, 0), mu_1 = (0, 2)
    s = 1.0 - 1.0 / math.sqrt(2.0)
    expected = np.array([[0.0, 1.0], [1.0, 0.0], [s, s]])
    np.testing.assert_allclose(ground_cost(feats, labels, weight), expected, atol=1e-15)
    sums = np.array([[6.0, 0.0], [0.0, 4.0]])
    np.testing.assert_allclose(cost_from_prototypes(weight, sums, [2, 2]), expected, atol=1e-15)


def test_proto_cos_zero_row_and_range():
    weight = np.array([[0.0, 0.0], [-1.0, 0.0]])
    feats = np.array([[1.0, 0.0], [0.0, 1.0]])
    m = ground_cost(feats, [0, 1], weight)
    np.testing.assert_allclose(m, [[1.0, 1.0], [2.0, 1.0]], atol=1e-15)


def test_cooc_hand_example():
    probs = np.array([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    labels = np.array([0, 1, 1])
    # soft joint J = [[0.5, 1.0], [0.5, 1.0]] -> P(c|k) = [[1/3, 2/3], [1/3, 2/3]]
    expected = -np.log(np.array([[1 / 3, 2 / 3], [1 / 3, 2 / 3]]))
    np.testing.assert_allclose(ground_cost(None, labels, None, kind="cooc", probs=probs), expected)
    clipped = cost_from_joint(np.array([[1.0, 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(clipped, -np.log(np.array([[1.0, 1e-6], [1e-6, 1e-6]])), atol=1e-12)


def test_ground_cost_kinds_and_errors():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    m = ground_cost(feats, torch.tensor([0, 1]), torch.eye(2))
    assert isinstance(m, torch.Tensor) and m.dtype == torch.float32
    with pytest.raises(ScoreInputError, match="classes without samples: 1"):
        ground_cost(np.ones((2, 2)), [0, 2], np.eye(2))
    with pytest.raises(ScoreInputError, match=r"labels must lie in \[0, 2\)"):
        ground_cost(np.ones((2, 2)), [0, 2], np.eye(2), num_classes=2)
    with pytest.raises(ScoreInputError, match="unknown ground cost"):
        ground_cost(np.ones((2, 2)), [0, 1], np.eye(2), kind="euclid")
    with pytest.raises(ScoreInputError, match="probs"):
        ground_cost(np.ones((2, 2)), [0, 1], np.eye(2), kind="cooc")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_equals_the_eager_solve():
    """A fixed-iteration prepared solve on CUDA is captured once and replayed: the same values
    as without the graph, for new inputs of the same shape, and earlier results are not
    overwritten by later replays."""
    import sctd_ray.ot as ot_mod

    p1, q1, m = (torch.from_numpy(a).float().cuda() for a in problems(32, 50, 10, seed=12))
    p2, q2, _ = (torch.from_numpy(a).float().cuda() for a in problems(32, 50, 10, seed=13))
    cost = prepare_cost(m, 0.1)
    with torch.no_grad():
        first = sinkhorn_prepared(p1, q1, cost, 20)
        kept = first.g.clone()
        second = sinkhorn_prepared(p2, q2, cost, 20)
    assert len(cost.graphs) == 1
    torch.testing.assert_close(first.g, kept, rtol=0, atol=0)
    old, ot_mod.CUDA_GRAPHS = ot_mod.CUDA_GRAPHS, False
    try:
        eager = [sinkhorn_prepared(p, q, prepare_cost(m, 0.1), 20) for p, q in ((p1, q1), (p2, q2))]
    finally:
        ot_mod.CUDA_GRAPHS = old
    for got, ref in zip((first, second), eager):
        for name in ("cost", "value", "f", "g"):
            torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-6, atol=1e-7)
