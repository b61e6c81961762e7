"""Streaming, mergeable statistics (SPEC 3) equal the in-memory scores."""

import numpy as np
import pytest
import torch

from sctd_ray import metrics
from sctd_ray.errors import ScoreInputError
from sctd_ray.stats import TeacherStats


def teacher_outputs(n=203, d=9, k=7, c=5, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    rng.shuffle(y)
    feats = rng.normal(size=(n, d)) + rng.normal(size=(c, d))[y] + 3.0   # far from 0 on purpose
    weight = rng.normal(size=(k, d))
    logits = feats @ weight.T / 3 + rng.normal(size=(n, k))
    return torch.from_numpy(feats), torch.from_numpy(logits), torch.from_numpy(y), torch.from_numpy(weight)


def reference(feats, logits, y, weight, tau_a=1.0, names=metrics.NAMES):
    probs = torch.softmax(logits.double() / tau_a, 1)
    return metrics.compute_all(probs, y, feats.double(), weight.double(), names=names)


def feed(stats, feats, logits, y, sizes):
    start = 0
    for b in sizes:
        stats.update(feats[start:start + b], logits[start:start + b], y[start:start + b])
        start += b
    assert start == len(y)
    return stats


def random_sizes(n, rng, hi=40):
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(min(rng.integers(1, hi), n - sum(sizes))))
    return sizes


def class_task(class_sizes, d, rng):
    """Features (shuffled classes of the given sizes, scaled per dimension, far from 0), logits,
    labels and a 6-class head, as tensors."""
    y = np.concatenate([np.full(m, i) for i, m in enumerate(class_sizes)])
    rng.shuffle(y)
    feats = rng.normal(size=(len(y), d)) * rng.uniform(0.2, 5, d) + 4.0
    weight = rng.normal(size=(6, d))
    logits = feats @ weight.T / 5 + rng.normal(size=(len(y), 6))
    return [torch.from_numpy(a) for a in (feats, logits, y, weight)]


def assert_close(got, ref, rel):
    assert list(got) == list(ref)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=rel, abs=rel * 1e-3), k


@pytest.mark.parametrize("buffer", [None, 16])       # 16: transrate folds into per-class scatters
def test_any_batching_equals_metrics(buffer):
    feats, logits, y, weight = teacher_outputs()
    ref = reference(feats, logits, y, weight)
    rng = np.random.default_rng(1)
    for sizes in ([len(y)], [1] * 20 + [len(y) - 20], random_sizes(len(y), rng)):
        st = feed(TeacherStats(5, weight, transrate_buffer=buffer), feats, logits, y, sizes)
        assert_close(st.compute(), ref, 1e-9)


@pytest.mark.parametrize("class_sizes, d", [((100, 60, 8, 5), 30),   # D x D and small Grams mixed
                                             ((10, 12, 9), 60),        # every class below D
                                             ((80, 90, 70), 12)])      # every class D x D
def test_scatter_from_transrate_class_grams_equals_metrics(class_sizes, d):
    """With transrate requested the global scatter (LogME, H-score, TransRate's total) is built
    from the class Grams at compute; every route gives the in-memory scores."""
    rng = np.random.default_rng(d)
    t = class_task(class_sizes, d, rng)
    st = feed(TeacherStats(len(class_sizes), t[3]), t[0], t[1], t[2], random_sizes(len(t[2]), rng))
    assert "scatter" not in st.to_state()
    assert_close(st.compute(), reference(*t), 1e-9)


@pytest.mark.parametrize("class_sizes, d, buffer", [((100, 60, 8, 5), 30, None),     # both sides
                                                     ((300, 3, 2, 1, 50, 49, 48), 40, None),
                                                     ((40, 41, 39, 10), 60, 16)])  # folded
def test_batched_class_rates_equal_metrics(monkeypatch, class_sizes, d, buffer):
    """Off the CPU TransRate's class rates come from batched factorisations of zero-padded class
    rows, a chunk of classes at a time (forced here on the CPU): the same scores, with chunks
    that never pad more rows than they hold."""
    from sctd_ray import stats as stats_mod

    monkeypatch.setattr(stats_mod, "_batched_class_rates", lambda device: True)
    monkeypatch.setattr(stats_mod, "_BATCH_BYTES", 3 * 60 * d * 8)   # a chunk: <= 180 padded rows
    shapes = []
    batched = metrics.logdet_identity_plus_batched
    monkeypatch.setattr(metrics, "logdet_identity_plus_batched",
                        lambda grams, *a: shapes.append(tuple(grams.shape)) or batched(grams, *a))
    one_at_a_time = []
    single = metrics.logdet_identity_plus
    monkeypatch.setattr(metrics, "logdet_identity_plus",
                        lambda *a: one_at_a_time.append(a) or single(*a))
    rng = np.random.default_rng(d)
    t = class_task(class_sizes, d, rng)
    names = ("transrate", "logme", "hscore")
    st = feed(TeacherStats(len(class_sizes), t[3], metrics=names, transrate_buffer=buffer),
              t[0], t[1], t[2], random_sizes(len(t[2]), rng))
    got = st.compute()
    assert len(one_at_a_time) == 1                                  # only TransRate's total
    monkeypatch.undo()
    assert_close(got, reference(*t, names=names), 1e-9)
    assert sum(s[0] for s in shapes) == len(class_sizes)            # every class, once
    if buffer is None:
        sizes = sorted(class_sizes, reverse=True)
        assert len(shapes) < len(class_sizes)                       # batched, in a few chunks
        for b, m, _ in shapes:                                      # padding <= the chunk's rows
            chunk, sizes = sizes[:b], sizes[b:]
            assert min(m, d) == min(chunk[0], d) and b * chunk[0] <= 2 * sum(chunk)


def test_parallel_finalise_gives_the_same_scores_and_its_errors(monkeypatch):
    """With PARALLEL_FINALISE (a GPU option, forced here on the CPU) LogME, H-score and
    TransRate's total run in threads of their own: the same scores, in the metrics' order, and
    an error in one of them is raised by compute."""
    import threading

    from sctd_ray import stats as stats_mod

    feats, logits, y, weight = teacher_outputs(seed=8)
    ref = reference(feats, logits, y, weight)
    monkeypatch.setattr(stats_mod, "_parallel_finalise", lambda device: True)
    threads = {}
    for name in ("logme_from_gram", "hscore_from_scatter"):
        real = getattr(metrics, name)
        monkeypatch.setattr(metrics, name, lambda *a, _f=real, _n=name: threads.setdefault(
            _n, threading.current_thread().name) and _f(*a))
    st = feed(TeacherStats(5, weight), feats, logits, y, [100, 103])
    assert_close(st.compute(), ref, 1e-12)
    assert all(t.startswith("sctd-finalise") for t in threads.values()) and len(threads) == 2

    def broken(*a):
        raise ScoreInputError("LogME failed on purpose")
    monkeypatch.setattr(metrics, "logme_from_gram", broken)
    with pytest.raises(ScoreInputError, match="on purpose"):
        st.compute()


@pytest.mark.parametrize("n, d", [(37, 64), (24, 25)])
def test_few_shot_statistics_use_the_row_gram_and_equal_metrics(monkeypatch, n, d):
    """Fewer samples than features (few-shot target, wide teacher): compute forms no D x D
    matrix (LogME, H-score and TransRate from the N x N Gram of the rows), in any batching and
    after merging parts, and gives the in-memory scores of both routes."""
    from sctd_ray import stats as stats_mod

    feats, logits, y, weight = teacher_outputs(n=n, d=d, seed=n)
    ref = reference(feats, logits, y, weight)

    def no_d_by_d(*a):
        raise AssertionError("a D x D scatter was built")
    monkeypatch.setattr(stats_mod.TeacherStats, "_scatter_and_class_rates", no_d_by_d)
    st = feed(TeacherStats(5, weight), feats, logits, y, random_sizes(n, np.random.default_rng(n), 9))
    assert_close(st.compute(), ref, 1e-9)
    half = TeacherStats(5, weight)
    feed(half, feats[:n // 2], logits[:n // 2], y[:n // 2], [n // 2])
    rest = TeacherStats.from_state(feed(TeacherStats(5, weight), feats[n // 2:], logits[n // 2:],
                                        y[n // 2:], [n - n // 2]).to_state())
    assert_close(half.merge(rest).compute(), ref, 1e-9)
    monkeypatch.undo()
    monkeypatch.setattr(metrics, "row_gram_route", lambda n, d: False)   # the D x D route
    assert_close(feed(TeacherStats(5, weight), feats, logits, y, [n]).compute(), ref, 1e-9)


def test_without_transrate_few_shot_rows_stand_for_the_scatter_until_d_samples():
    """LogME and H-score alone keep the raw rows while there are fewer samples than features
    (no D x D product per batch, the N x N route at compute) and switch to the Welford moments
    once D samples are seen, also when merging parts: every path gives the in-memory scores."""
    names = ("logme", "hscore")
    feats, logits, y, weight = teacher_outputs(n=60, d=40, seed=13)
    rng = np.random.default_rng(13)

    def part(lo, hi):
        return feed(TeacherStats(5, weight, metrics=names), feats[lo:hi], logits[lo:hi], y[lo:hi],
                    random_sizes(hi - lo, rng, 9))

    few = part(0, 30)
    state = few.to_state()
    assert state["few_x"].shape == (30, 40) and "scatter" not in state     # rows, no D x D
    assert_close(few.compute(), reference(feats[:30], logits[:30], y[:30], weight, names=names), 1e-9)
    assert_close(TeacherStats.from_state(state).compute(), few.compute(), 1e-12)
    ref = reference(feats, logits, y, weight, names=names)
    whole = part(0, 60)                                         # crosses D = 40 while updating
    assert "few_x" not in whole.to_state() and whole.to_state()["scatter"].shape == (40, 40)
    assert_close(whole.compute(), ref, 1e-9)
    for cuts in ([0, 10, 25, 60], [0, 30, 60], [0, 45, 50, 60]):   # few + few, few + moments, ...
        parts = [TeacherStats.from_state(part(a, b).to_state()) for a, b in zip(cuts, cuts[1:])]
        total = TeacherStats(5, weight, metrics=names)
        for p in parts[::-1]:
            total.merge(p)
        assert_close(total.compute(), ref, 1e-9)
    small = part(0, 10).merge(part(10, 25))                      # still few after merging
    assert "few_x" in small.to_state()
    assert_close(small.compute(), reference(feats[:25], logits[:25], y[:25], weight, names=names), 1e-9)


def test_split_among_workers_merges_in_any_order_and_survives_shipping():
    feats, logits, y, weight = teacher_outputs(seed=2)
    ref = reference(feats, logits, y, weight)
    cuts = [0, 50, 51, 140, len(y)]
    rng = np.random.default_rng(3)

    def part(i, buffer=None):
        sl = slice(cuts[i], cuts[i + 1])
        return feed(TeacherStats(5, weight, transrate_buffer=buffer), feats[sl], logits[sl], y[sl],
                    random_sizes(cuts[i + 1] - cuts[i], rng, 25))

    for order in [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1), (1, 3, 0, 2)]:
        parts = [part(i, buffer=30 if i % 2 else None) for i in order]
        # ship every part through a plain dict of numpy arrays, as between processes
        parts = [TeacherStats.from_state(p.to_state()) for p in parts]
        total = TeacherStats(5, weight)
        for p in parts:
            total.merge(p)
        assert_close(total.compute(), ref, 1e-9)
    tree = part(0).merge(part(1)).merge(part(2).merge(part(3)))
    assert_close(tree.compute(), ref, 1e-9)


def test_float32_accumulation():
    feats, logits, y, weight = teacher_outputs(seed=4)
    ref = reference(feats, logits, y, weight)
    st = TeacherStats(5, weight.float(), dtype=torch.float32)
    feed(st, feats.float(), logits.float(), y, random_sizes(len(y), np.random.default_rng(5)))
    state = st.to_state()
    assert state["rows"].dtype == np.float32 and state["tr_x"].dtype == np.float32
    assert state["sums"].dtype == np.float64
    assert "scatter" not in state      # with transrate, S comes from its class statistics
    assert_close(st.compute(), reference(feats.float(), logits.float(), y, weight.float()), 1e-4)
    assert_close(st.compute(), ref, 1e-4)
    no_tr = ("logme", "hscore")        # without it, a float64 Welford scatter
    st = TeacherStats(5, weight.float(), metrics=no_tr, dtype=torch.float32)
    feed(st, feats.float(), logits.float(), y, random_sizes(len(y), np.random.default_rng(5)))
    assert st.to_state()["scatter"].dtype == np.float64
    assert_close(st.compute(), reference(feats, logits, y, weight, names=no_tr), 1e-4)


def test_only_what_the_metrics_need_is_kept():
    feats, logits, y, weight = teacher_outputs(seed=6)
    probs_only = feed(TeacherStats(5, weight, metrics=("leep", "nce")), feats, logits, y, [100, 103])
    state = probs_only.to_state()
    assert {"scatter", "sums", "tr_x", "mean"}.isdisjoint(state)
    assert state["rows"].shape == (203, 7)
    assert_close(probs_only.compute(), reference(feats, logits, y, weight, names=("leep", "nce")), 1e-12)
    cost_only = feed(TeacherStats(5, weight, metrics=("sctd_cost",)), feats, logits, y, [203])
    assert {"scatter", "rows", "tr_x"}.isdisjoint(cost_only.to_state())
    no_transrate = feed(TeacherStats(5, weight, metrics=("logme", "hscore")), feats, logits, y, [203])
    assert {"tr_x", "tr_scatter", "rows", "joint"}.isdisjoint(no_transrate.to_state())
    assert {"fused_x", "rows"}.isdisjoint(cost_only.to_state())
    # features are not even needed when only probability scores are requested
    TeacherStats(5, weight, metrics=("nce",)).update(None, logits, y)


def test_sctd_keeps_p_times_unit_weights_when_that_is_smaller():
    """K = 30 > D = 6: sctd stores N x D rows of P W_unit instead of N x K probabilities."""
    feats, logits, y, weight = teacher_outputs(d=6, k=30, seed=7)
    st = feed(TeacherStats(5, weight, metrics=("sctd", "sctd_cost")), feats, logits, y, [64, 64, 75])
    assert st.to_state()["rows"].shape == (203, 6)
    assert_close(st.compute(), reference(feats, logits, y, weight, names=("sctd", "sctd_cost")), 1e-10)


def test_sctd_fused_shares_its_rows_with_sctd_leep_and_transrate():
    """sctd_fused needs leave-one-out prototypes: per sample P W_unit (kept as the row of P when
    K <= D, the same rows sctd and leep use) and the features, which are the very tensors of the
    transrate buffer (no second copy)."""
    feats, logits, y, weight = teacher_outputs(seed=12)       # K = 7 <= D = 9: rows of P
    names = ("sctd_fused", "transrate", "sctd", "leep")
    st = feed(TeacherStats(5, weight, metrics=names), feats, logits, y, [50, 153])
    assert all(a is b for a, b in zip(st._fx, st._tr_x))
    state = st.to_state()
    assert state["rows"].shape == (203, 7) and state["fused_x"].shape == (203, 9)
    assert {"fused_h", "fused_y"}.isdisjoint(state)
    assert_close(st.compute(), reference(feats, logits, y, weight, names=names), 1e-10)
    assert_close(TeacherStats.from_state(state).compute(), st.compute(), 1e-12)
    # K = 30 > D = 6 without leep: rows of P W_unit, N x D
    feats, logits, y, weight = teacher_outputs(d=6, k=30, seed=13)
    names = ("sctd_fused", "sctd")
    st = feed(TeacherStats(5, weight, metrics=names), feats, logits, y, [64, 139])
    assert st.to_state()["rows"].shape == (203, 6)
    assert_close(st.compute(), reference(feats, logits, y, weight, names=names), 1e-10)
    merged = feed(TeacherStats(5, weight, metrics=names), feats[:80], logits[:80], y[:80], [80])
    merged.merge(feed(TeacherStats(5, weight, metrics=names), feats[80:], logits[80:], y[80:], [123]))
    assert_close(merged.compute(), st.compute(), 1e-12)


def test_teacher_temperature():
    feats, logits, y, weight = teacher_outputs(seed=8)
    st = feed(TeacherStats(5, weight, metrics=("leep", "sctd"), tau_a=2.5), feats, logits, y, [203])
    assert_close(st.compute(), reference(feats, logits, y, weight, 2.5, ("leep", "sctd")), 1e-12)


def test_bad_data_is_reported_at_compute():
    feats, logits, y, weight = teacher_outputs(seed=9)
    st = TeacherStats(5, weight)
    st.update(feats[:10], logits[:10], y[:10] + 10)          # counted, no error yet (no GPU sync)
    with pytest.raises(ScoreInputError, match=r"labels must lie in \[0, 5\); 10 labels"):
        st.compute()
    nan = feats.clone()
    nan[3, 2] = float("nan")
    st = feed(TeacherStats(5, weight), nan, logits, y, [203])
    with pytest.raises(ScoreInputError, match="finite"):
        st.compute()
    bad_logits = logits.clone()
    bad_logits[7, 1] = float("inf")                         # softmax row becomes NaN
    for names in [metrics.NAMES, ("nce",), ("sctd",), ("sctd_fused",), ("leep",)]:
        st = feed(TeacherStats(5, weight, metrics=names), feats, bad_logits, y, [100, 103])
        with pytest.raises(ScoreInputError, match="finite"):   # never a silent score
            st.compute()
        with pytest.raises(ScoreInputError, match="finite"):   # nor after shipping
            TeacherStats.from_state(st.to_state()).compute()
    st = TeacherStats(5, weight)
    st.update(feats[y < 4], logits[y < 4], y[y < 4])
    with pytest.raises(ScoreInputError, match="classes without samples: 4"):
        st.compute()
    with pytest.raises(ScoreInputError, match="no samples"):
        TeacherStats(5, weight).compute()
    with pytest.raises(ScoreInputError, match=r"features must have shape \(4, 9\)"):
        TeacherStats(5, weight).update(feats[:4, :8], logits[:4], y[:4])
    with pytest.raises(ScoreInputError, match="unknown metric"):
        TeacherStats(5, weight, metrics=("auc",))


def test_merge_refuses_other_teachers_or_settings():
    feats, logits, y, weight = teacher_outputs(seed=10)
    a = feed(TeacherStats(5, weight), feats, logits, y, [203])
    with pytest.raises(ScoreInputError, match="weights differ"):
        a.merge(feed(TeacherStats(5, weight + 1), feats, logits, y, [203]))
    with pytest.raises(ScoreInputError, match="metrics"):
        a.merge(TeacherStats(5, weight, metrics=("leep",)))


def test_a_device_update_reads_nothing_back_to_the_host():
    """Off the CPU, update() only queues work (SPEC 3's streaming statistics must not stall a
    GPU per batch). The meta device stands in for CUDA: reading a meta tensor's value raises."""
    k, d, c = 5, 16, 3
    stats = TeacherStats(c, torch.randn(k, d), metrics=metrics.NAMES, device="meta",
                         dtype=torch.float32)
    for _ in range(3):
        stats.update(torch.randn(8, d, device="meta"), torch.randn(8, k, device="meta"),
                     torch.full((8,), c + 5, dtype=torch.long, device="meta"))   # even bad labels
    assert stats.n == 24 and stats._bad.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_accumulates_on_device_and_matches_cpu():
    feats, logits, y, weight = teacher_outputs(seed=11)
    ref = reference(feats, logits, y, weight)
    st = TeacherStats(5, weight.float().cuda(), dtype=torch.float32)
    feed(st, feats.float().cuda(), logits.float().cuda(), y.cuda(), [50, 50, 103])
    assert st._sums.device.type == st._prob_sum.device.type == "cuda"   # accumulated there
    assert_close(st.compute(), ref, 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("buffer", [None, 16])
def test_cuda_batched_class_rates_and_parallel_finalise_match_cpu(monkeypatch, buffer):
    """On CUDA TransRate's class rates are batched (raw rows and folded scatters), few-shot
    targets take the N x N route, and with PARALLEL_FINALISE LogME, H-score and TransRate run on
    side streams: all equal the CPU's scores."""
    from sctd_ray import stats as stats_mod

    for n in (403, 30):    # 30 < D: the few-shot route (N x N Grams)
        feats, logits, y, weight = teacher_outputs(n=n, d=40, seed=12)
        ref = feed(TeacherStats(5, weight, transrate_buffer=buffer), feats, logits, y, [n]).compute()
        for parallel in (False, True):
            monkeypatch.setattr(stats_mod, "PARALLEL_FINALISE", parallel)
            st = TeacherStats(5, weight.cuda(), device="cuda", transrate_buffer=buffer)
            feed(st, feats.cuda(), logits.cuda(), y.cuda(), [n // 2, n - n // 2])
            assert stats_mod._batched_class_rates(st._sums.device)
            assert_close(st.compute(), ref, 1e-9)
