"""Scores on in-memory arrays (SPEC 2-3) against hand-derived values and independent code."""

import math

import numpy as np
import pytest
import torch

from sctd_ray import metrics
from sctd_ray.errors import ScoreInputError


def random_task(n=120, d=10, k=6, c=4, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    rng.shuffle(y)
    feats = rng.normal(size=(n, d)) + rng.normal(size=(c, d))[y] + 1.5
    weight = rng.normal(size=(k, d))
    z = feats @ weight.T / 2
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return probs, y, feats, weight


# --------------------------------------------------------------------------- OT scores

def two_by_two():
    """Teacher classes aligned with target classes: M = [[0, 1], [1, 0]], so A[i] = (p_i1, p_i0)."""
    weight = np.array([[1.0, 0.0], [0.0, 1.0]])
    feats = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    labels = np.array([0, 1, 0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    return probs, labels, feats, weight


def test_sctd_cost_and_sctd_by_hand():
    probs, labels, feats, weight = two_by_two()
    # A[i, y_i]: sample 0 (y=0) -> p_01 = 0.1, sample 1 (y=1) -> p_10 = 0.2, sample 2 -> 0.4
    assert metrics.sctd_cost(probs, labels, feats, weight) == pytest.approx(-(0.1 + 0.2 + 0.4) / 3)
    t = 0.5
    # log softmax_c(-A_i / T)[y_i] with A_0 = (0.1, 0.9), A_1 = (0.8, 0.2), A_2 = (0.4, 0.6)
    l0 = -0.1 / t - math.log(math.exp(-0.1 / t) + math.exp(-0.9 / t))
    l1 = -0.2 / t - math.log(math.exp(-0.8 / t) + math.exp(-0.2 / t))
    l2 = -0.4 / t - math.log(math.exp(-0.4 / t) + math.exp(-0.6 / t))
    assert metrics.sctd(probs, labels, feats, weight, temperature=t) == pytest.approx((l0 + l1 + l2) / 3)


def test_sctd_is_not_fooled_by_a_collapsed_teacher():
    """On class-0 heavy data a teacher predicting class 0 for everything has the better
    sctd_cost (SPEC 2), but only the informative teacher singles out the labels under sctd."""
    weight = np.eye(2)                                   # M = [[0, 1], [1, 0]]
    feats = np.array([[1.0, 0.0]] * 4 + [[0.0, 1.0]])
    labels = np.array([0, 0, 0, 0, 1])
    collapsed = np.array([[0.99, 0.01]] * 5)             # A[i, y_i]: 0.01 x 4, 0.99
    informative = np.array([[0.7, 0.3]] * 4 + [[0.3, 0.7]])   # A[i, y_i] = 0.3
    assert metrics.sctd_cost(collapsed, labels, feats, weight) == pytest.approx(-(0.04 + 0.99) / 5)
    assert metrics.sctd_cost(informative, labels, feats, weight) == pytest.approx(-0.3)
    assert metrics.sctd(informative, labels, feats, weight) > metrics.sctd(collapsed, labels, feats, weight)


# --------------------------------------------------------------------------- LEEP / NCE

def test_leep_by_hand():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    labels = np.array([0, 1, 0])
    # J = (1/3) [[0.9 + 0.6, 0.2], [0.1 + 0.4, 0.8]]; P(c|k) = J / row sums
    p0 = [1.5 / 1.7, 0.2 / 1.7]
    p1 = [0.5 / 1.3, 0.8 / 1.3]
    e0 = 0.9 * p0[0] + 0.1 * p1[0]
    e1 = 0.2 * p0[1] + 0.8 * p1[1]
    e2 = 0.6 * p0[0] + 0.4 * p1[0]
    expected = (math.log(e0) + math.log(e1) + math.log(e2)) / 3
    assert metrics.leep(probs, labels) == pytest.approx(expected, rel=1e-14)


def test_nce_on_a_contingency_table():
    # argmax z / label y table: z=0 -> y=0 three times, y=1 once; z=1 -> y=1 four times
    probs = np.array([[0.7, 0.3]] * 4 + [[0.2, 0.8]] * 4)
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))   # H(Y | z=0); H(Y | z=1) = 0
    assert metrics.nce(probs, labels) == pytest.approx(-0.5 * h, rel=1e-14)
    assert metrics.nce(np.array([[1.0, 0.0]] * 2 + [[0.0, 1.0]] * 2), [0, 0, 1, 1]) == 0.0


# --------------------------------------------------------------------------- feature scores

def test_hscore_with_known_covariances():
    """Class means (-1, 0) and (1, 0), offsets (+-1, +-1): cov f = diag(16, 8)/7,
    cov E[f|y] = diag(8, 0)/7, so tr(cov_f^-1 cov_g) = 8/16."""
    offsets = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=float)
    feats = np.concatenate([offsets + [-1, 0], offsets + [1, 0]])
    labels = np.array([0] * 4 + [1] * 4)
    assert metrics.hscore(feats, labels) == pytest.approx(0.5, rel=1e-12)


def test_hscore_when_features_outnumber_samples_is_c_minus_1():
    """With N <= D + 1 the centred data span everything the class means do: tr(S_T^+ S_B) = C-1.
    The reference code's 1e-15 pinv cutoff would invert round-off here."""
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(9, 20))
    assert metrics.hscore(feats, np.arange(9) % 3) == pytest.approx(2.0, rel=1e-8)


def authors_transrate(z, y, eps=1e-4):
    """TransRate as in the authors' code: slogdet of I + Z^T Z/(n eps), Z centred once."""
    def rate(zz):
        n, d = zz.shape
        return 0.5 * np.linalg.slogdet(np.eye(d) + zz.T @ zz / (n * eps))[1]
    z = z - z.mean(0, keepdims=True)
    k = int(y.max() + 1)
    return rate(z) - sum(rate(z[y == i]) for i in range(k)) / k


@pytest.mark.parametrize("n,d", [(200, 8), (24, 40), (60, 12)])
def test_transrate_equals_the_direct_logdet_formula(n, d):
    _, y, feats, _ = random_task(n=n, d=d, seed=n)
    assert metrics.transrate(feats, y) == pytest.approx(authors_transrate(feats, y), rel=1e-9)
    assert metrics.transrate(feats, y, eps=1e-2) == pytest.approx(authors_transrate(feats, y, 1e-2),
                                                                  rel=1e-9)


def authors_logme(f, y):
    """Independent transcription of LogME.py ``_fit_fixed_point`` (You et al., arXiv:2110.10545)."""
    n, d = f.shape
    if n > d:
        _, s2, vh = np.linalg.svd(f.T @ f)
        s = np.sqrt(s2)
        k = int(np.sum(s > 1e-10))
        u = (f @ vh.T)[:, :k] / s[:k]
        s = s[:k]
    else:
        u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = (s ** 2).reshape(-1, 1)
    evidences = []
    for c in range(int(y.max() + 1)):
        y_ = (y == c).astype(np.float64).reshape(-1, 1)
        x2 = (u.T @ y_) ** 2
        res_x2 = (y_ ** 2).sum() - x2.sum()
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = (sigma / (sigma + t)).sum()
            m2 = (sigma * x2 / ((t + sigma) ** 2)).sum()
            res2 = (x2 / ((1 + sigma / t) ** 2)).sum() + res_x2
            alpha = gamma / (m2 + 1e-5)
            beta = (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        ev = (d / 2.0 * np.log(alpha) + n / 2.0 * np.log(beta)
              - 0.5 * np.sum(np.log(alpha + beta * sigma)) - beta / 2.0 * res2
              - alpha / 2.0 * m2 - n / 2.0 * np.log(2 * np.pi))
        evidences.append(ev / n)
    return float(np.mean(evidences))


@pytest.mark.parametrize("n,d", [(300, 12), (30, 50), (40, 40)])
def test_logme_equals_the_authors_algorithm(n, d):
    _, y, feats, _ = random_task(n=n, d=d, seed=d)
    assert metrics.logme(feats, y) == pytest.approx(authors_logme(feats, y), rel=1e-9)


@pytest.mark.parametrize("d,rank", [(1, 1), (2, 2), (64, 64), (96, 96), (128, 500), (300, 40)])
def test_eigh_projections_equal_an_eigendecomposition(d, rank):
    """Eigenvalues and |V^T b| (eigenvectors are defined up to sign) from the tridiagonal route
    equal numpy's eigendecomposition, also for a rank-deficient Gram (D > N)."""
    rng = np.random.default_rng(d)
    f = rng.normal(size=(rank, d)) + 2.0
    gram, b = f.T @ f, rng.normal(size=(d, 4))
    w, proj = metrics.eigh_projections(gram, b)
    w0, v0 = np.linalg.eigh(gram)
    scale = w0[-1]
    assert np.max(np.abs(w - w0)) <= 1e-12 * scale
    big = w0 > 1e-8 * scale        # the projections on well-separated eigenvalues are unique
    np.testing.assert_allclose(np.abs(proj[big]), np.abs(v0[:, big].T @ b), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose((proj ** 2).sum(0), (b ** 2).sum(0), rtol=1e-12)   # V orthogonal


def test_gram_lower_is_the_lower_triangle_of_the_gram():
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.normal(size=(30, 7)))
    full = x.T @ x
    for arg in (x, x.T.contiguous().T, x[::2], x.T):        # C order, Fortran order, strided, wide
        g = metrics.gram_lower(arg)
        ref = arg.T @ arg
        torch.testing.assert_close(torch.tril(g), torch.tril(ref), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(metrics.symmetrise_lower(g), ref, rtol=1e-12, atol=1e-12)
    assert bool((torch.triu(metrics.gram_lower(x), 1) == 0).all())
    torch.testing.assert_close(metrics.gram_lower(x.float()), full.float())   # other dtypes: full


def test_logdet_identity_plus_reads_the_lower_triangle_and_survives_round_off():
    rng = np.random.default_rng(6)
    z = rng.normal(size=(12, 5))
    g = torch.from_numpy(z.T @ z)
    ref = np.linalg.slogdet(np.eye(5) + 0.3 * (z.T @ z))[1]
    assert metrics.logdet_identity_plus(torch.tril(g), 0.3) == pytest.approx(ref, rel=1e-12)
    assert metrics.logdet_identity_plus(g, 0.3) == pytest.approx(ref, rel=1e-12)
    # I + G not positive definite (a round-off-sized negative eigenvalue, exaggerated): the
    # eigenvalues of the symmetric matrix, clamped at 1; eig{[[-2, 1], [1, -2]]} = {-3, -1}
    bad = torch.tensor([[-2.0, 0.0], [1.0, 3.0]], dtype=torch.float64)   # lower triangle only
    ev = np.linalg.eigvalsh(np.eye(2) + np.array([[-2.0, 1.0], [1.0, 3.0]]))
    assert metrics.logdet_identity_plus(bad, 1.0) == pytest.approx(np.log(np.maximum(ev, 1)).sum())


def test_batched_logdet_identity_plus_equals_one_at_a_time():
    """The batched factorisation (TransRate's class rates off the CPU) gives each matrix's value,
    scaled per matrix, lower triangles read, and falls back to eigenvalues only where needed."""
    rng = np.random.default_rng(7)
    grams = [torch.from_numpy((lambda z: z.T @ z)(rng.normal(size=(m, 6)))) for m in (3, 9, 20)]
    grams.append(torch.tensor([[-2.0, 0, 0, 0, 0, 0], [1.0, 3.0, 0, 0, 0, 0]] + [[0.0] * 6] * 4,
                              dtype=torch.float64))   # I + G indefinite: the eigenvalue route
    scales = [0.3, 1.0 / 9, 2.0, 1.0]
    ref = [metrics.logdet_identity_plus(g, s) for g, s in zip(grams, scales)]
    batch = torch.stack([torch.tril(g) for g in grams])
    got = metrics.logdet_identity_plus_batched(batch, torch.tensor(scales, dtype=torch.float64))
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    assert torch.equal(batch[0], torch.tril(grams[0]))           # the input is left as it was
    scaled = batch * torch.tensor(scales, dtype=torch.float64)[:, None, None]
    np.testing.assert_allclose(metrics.logdet_identity_plus_batched(scaled), ref, rtol=1e-12)


def test_hscore_cholesky_route_equals_the_eigen_route():
    _, y, feats, _ = random_task(n=120, d=10, seed=8)
    f = feats - feats.mean(0)
    sums = np.stack([feats[y == c].sum(0) for c in range(int(y.max()) + 1)])
    counts = np.bincount(y).astype(np.float64)
    scat = f.T @ f
    fast = metrics.hscore_from_scatter(scat, sums, counts, len(y))
    slow = metrics.hscore_from_scatter(scat, sums, counts, len(y), eig=metrics.sym_eigh(scat))
    assert fast == pytest.approx(slow, rel=1e-10)
    dev = sums / counts[:, None] - sums.sum(0) / len(y)
    assert metrics._hscore_cholesky(scat, dev, counts) == pytest.approx(fast, rel=1e-15)


@pytest.mark.parametrize("d,n", [(10, 120), (40, 30)])   # certified Cholesky; rank-deficient
def test_device_route_for_logme_and_hscore_equals_the_host_route(d, n):
    """The torch route (what a GPU runs, kept on the device) on a CPU tensor: the same values
    as the LAPACK route, through the Cholesky certificate and through the eigenvectors."""
    _, y, feats, _ = random_task(n=n, d=d, seed=9)
    sums = np.stack([feats[y == c].sum(0) for c in range(int(y.max()) + 1)])
    counts = np.bincount(y).astype(np.float64)
    f = feats - feats.mean(0)
    scat, gram = f.T @ f, feats.T @ feats
    host = metrics.hscore_from_scatter(scat, sums, counts, n)
    assert metrics.hscore_from_scatter(torch.from_numpy(scat), sums, counts, n) == \
        pytest.approx(host, rel=1e-9)
    dev = sums / counts[:, None] - sums.sum(0) / n
    assert (metrics._hscore_cholesky(scat, dev, counts) is None) == (d > n)   # both routes ran
    host = metrics.logme_from_gram(gram, sums, counts, n)
    assert metrics.logme_from_gram(torch.from_numpy(gram).float(), sums, counts, n) == \
        pytest.approx(metrics.logme_from_gram(gram.astype(np.float32).astype(np.float64), sums,
                                              counts, n), rel=1e-9)
    assert metrics.logme_from_gram(torch.from_numpy(gram), sums, counts, n) == pytest.approx(host, rel=1e-9)


@pytest.mark.parametrize("n,d", [(12, 40), (30, 31), (25, 200)])
def test_few_shot_row_gram_route_equals_the_feature_gram_route(monkeypatch, n, d):
    """With fewer samples than features LogME and H-score decompose the N x N Gram of the
    samples (on the host, or as torch on a device): the values of the D x D route."""
    _, y, feats, _ = random_task(n=n, d=d, seed=n + d)
    assert metrics.row_gram_route(n, d)
    got = metrics.compute_all(None, y, feats, None, names=("logme", "hscore", "transrate"))
    monkeypatch.setattr(metrics, "row_gram_route", lambda n, d: False)
    ref = metrics.compute_all(None, y, feats, None, names=("logme", "hscore", "transrate"))
    assert got == pytest.approx(ref, rel=1e-9)
    assert got["hscore"] == pytest.approx(3.0, rel=1e-8)     # C - 1 when N <= D + 1
    counts = np.bincount(y).astype(np.float64)
    z = feats - feats.mean(0)
    t = torch.from_numpy
    assert metrics.logme_from_row_gram(t(feats @ feats.T), t(y), counts, n, d) == \
        pytest.approx(got["logme"], rel=1e-9)
    assert metrics.hscore_from_row_gram(t(z @ z.T), t(y), counts) == pytest.approx(3.0, rel=1e-8)


def test_sctd_from_costs_on_a_tensor_equals_the_host_route():
    rng = np.random.default_rng(3)
    a, y = rng.uniform(0, 2, size=(50, 4)), rng.integers(0, 4, 50)
    host = metrics.sctd_from_costs(a, y, 0.1)
    assert metrics.sctd_from_costs(torch.from_numpy(a), torch.from_numpy(y), 0.1) == \
        pytest.approx(host, rel=1e-13)


def test_logme_prefers_separable_features():
    rng = np.random.default_rng(5)
    y = np.arange(200) % 2
    noise = rng.normal(size=(200, 5))
    good = noise + 4.0 * np.eye(5)[y]
    assert metrics.logme(good, y) > metrics.logme(noise, y)


# --------------------------------------------------------------------------- API

def test_compute_all_matches_single_scores_and_accepts_torch():
    probs, y, feats, weight = random_task()
    all_ = metrics.compute_all(probs, y, feats, weight)
    assert tuple(all_) == metrics.NAMES
    single = {"sctd": metrics.sctd(probs, y, feats, weight),
              "sctd_cost": metrics.sctd_cost(probs, y, feats, weight),
              "sctd_fused": metrics.sctd_fused(probs, y, feats, weight),
              "leep": metrics.leep(probs, y), "nce": metrics.nce(probs, y),
              "logme": metrics.logme(feats, y), "hscore": metrics.hscore(feats, y),
              "transrate": metrics.transrate(feats, y)}
    assert all_ == single
    assert all(isinstance(v, float) for v in all_.values())
    t = metrics.compute_all(torch.tensor(probs, dtype=torch.float32), torch.tensor(y),
                            torch.tensor(feats, dtype=torch.float32), torch.tensor(weight))
    for k in all_:
        assert t[k] == pytest.approx(all_[k], rel=1e-4, abs=1e-5)
    assert metrics.compute_all(None, y, feats, None, names=("logme",)) == {"logme": all_["logme"]}


def test_num_classes_is_respected():
    probs, y, feats, weight = random_task(c=3)
    with pytest.raises(ScoreInputError, match="classes without samples: 3"):
        metrics.leep(probs, y, num_classes=4)


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(labels=np.where(a["labels"] == 0, -1, a["labels"])), r"labels must lie in \[0, 4\); got values from -1"),
    (lambda a: a.update(labels=np.where(a["labels"] == 2, 0, a["labels"])), "classes without samples: 2"),
    (lambda a: a["probs"].__setitem__((3, 1), np.nan), r"probs must be finite; got 1 NaN/inf entries \(first at \[3, 1\]"),
    (lambda a: a["features"].__setitem__((0, 0), np.inf), "features must be finite"),
    (lambda a: a.update(probs=a["probs"][:-1]), "features has 120 rows but probs has 119"),
    (lambda a: a.update(weight=a["weight"][:, :-1]), r"weight must be \(K, D\) with D = 10"),
    (lambda a: a.update(weight=a["weight"][:-1]), "weight must have K = 6 rows"),
    (lambda a: a.update(probs=a["probs"] * 2), "probs rows must sum to 1"),
    (lambda a: a.update(labels=a["labels"][:, None]), r"labels must have shape \(120,\)"),
    (lambda a: a.update(labels=a["labels"] + 0.5), "labels must be integers"),
])
def test_bad_inputs_say_what_was_expected(mutate, match):
    probs, y, feats, weight = random_task()
    args = {"probs": probs.copy(), "labels": y.copy(), "features": feats.copy(), "weight": weight.copy()}
    mutate(args)
    with pytest.raises(ScoreInputError, match=match):
        metrics.compute_all(args["probs"], args["labels"], args["features"], args["weight"])


def test_unknown_name_and_tiny_inputs():
    probs, y, feats, weight = random_task()
    with pytest.raises(ScoreInputError, match="unknown score"):
        metrics.compute_all(probs, y, feats, weight, names=("auc",))
    with pytest.raises(ScoreInputError, match="at least 2 samples"):
        metrics.hscore(feats[:1], [0])


def test_default_rank_by_is_a_score_and_the_cli_agrees():
    from sctd_ray import cli

    assert metrics.DEFAULT_RANK_BY in metrics.NAMES
    assert cli.DEFAULT_RANK_BY == metrics.DEFAULT_RANK_BY
