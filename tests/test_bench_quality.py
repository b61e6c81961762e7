"""sctd bench quality (SPEC 6): measures on hand examples, spread filtering, the ground-truth
cache, the JSON schema, and arbitrary zoo/target folders. Distillation is replaced by a cheap
fake (a real student takes tens of seconds); the probe and the scores run for real on a tiny
zoo built here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sctd_ray.bench import groundtruth as gtm
from sctd_ray.bench import quality as q


# --------------------------------------------------------------------------- measures

def test_weighted_tau_matches_scipy_and_hand_cases():
    from scipy.stats import weightedtau

    gt = [0.9, 0.8, 0.7, 0.6, 0.5]
    assert q.weighted_tau([5, 4, 3, 2, 1], gt) == pytest.approx(1.0)
    assert q.weighted_tau([1, 2, 3, 4, 5], gt) == pytest.approx(-1.0)
    s = [3.0, 5.0, 1.0, 2.0, 4.0]
    assert q.weighted_tau(s, gt) == pytest.approx(weightedtau(s, gt).statistic)
    # swapping the top pair costs more than swapping the bottom pair (hyperbolic weights)
    top = q.weighted_tau([4, 5, 3, 2, 1], gt)
    bottom = q.weighted_tau([5, 4, 3, 1, 2], gt)
    assert top < bottom < 1.0
    assert q.weighted_tau([1, 1, 1, 1, 1], gt) == 0.0
    assert math.isnan(q.weighted_tau([1, 2, 3], [0.5, 0.5, 0.5]))


def test_top1_regret_in_points_and_ties():
    gt = [0.60, 0.75, 0.70]
    assert q.top1_regret([0.1, 0.9, 0.3], gt) == pytest.approx(0.0)
    assert q.top1_regret([0.9, 0.1, 0.3], gt) == pytest.approx(15.0)
    assert q.top1_regret([0.9, 0.1, 0.9], gt) == pytest.approx(10.0)  # tie: mean of 60 and 70
    assert q.random_regret(gt) == pytest.approx(100 * (0.75 - np.mean(gt)))


def test_random_tau_is_near_zero_and_bootstrap_brackets_the_mean():
    gt = list(np.linspace(0.5, 0.9, 12))
    assert abs(q.random_tau(gt, n=300)) < 0.08
    lo, hi = q.bootstrap_ci([0.2, 0.4, 0.6, 0.8])
    assert lo < 0.5 < hi and 0.2 <= lo and hi <= 0.8
    assert all(math.isnan(x) for x in q.bootstrap_ci([0.81, 0.3]))   # 2 targets: no interval, "-"


def test_evaluate_leaves_flat_targets_out_of_the_means():
    teachers = [f"t{i}" for i in range(5)]
    good = dict(zip(teachers, [0.9, 0.8, 0.7, 0.6, 0.5]))
    flat = dict(zip(teachers, [0.715, 0.712, 0.708, 0.704, 0.700]))   # spread 1.5 points
    scores = {"s": {"a": dict(zip(teachers, [5, 4, 3, 2, 1])), "b": dict(zip(teachers, [1, 2, 3, 4, 5]))}}
    res = q.evaluate(scores, {"probe": {"a": good, "b": flat}}, n_random=50)
    assert res["used_targets"]["probe"] == ["a"]
    assert res["spread"]["b"]["probe"] == pytest.approx(1.5)
    e = res["metrics"]["s"]
    assert e["tau_w_probe_mean"] == pytest.approx(1.0)            # b (tau -1) is left out
    assert e["per_target"]["b"]["tau_w_probe"] == pytest.approx(-1.0)   # but still reported
    assert e["regret_probe_mean"] == pytest.approx(0.0)
    assert e["tau_w_mean"] is None                                # no distill ground truth
    assert "random" in res["metrics"]
    table = q.format_table(res, 5)
    assert "no signal" in table and "b" in table


def test_the_table_orders_metrics_by_mean_with_zero_among_the_numbers():
    """A score constant over the zoo (H-score saturates at C - 1 on a 10-shot target) has tau 0.0:
    it sorts between the positive and negative means (was below every negative one: 0.0 was
    taken as missing)."""
    teachers = [f"t{i}" for i in range(5)]
    truth = dict(zip(teachers, [0.9, 0.8, 0.7, 0.6, 0.5]))
    scores = {"up": dict(zip(teachers, [5, 4, 3, 2, 1])), "flat": dict.fromkeys(teachers, 4.0),
              "down": dict(zip(teachers, [1, 2, 3, 4, 6]))}
    res = q.evaluate({m: {"a": s} for m, s in scores.items()}, {"probe": {"a": truth}}, n_random=50)
    assert res["metrics"]["flat"]["tau_w_probe_mean"] == 0.0
    rows = [ln.split()[0] for ln in q.format_table(res, 5).splitlines()[-4:]]
    assert rows.index("up") < rows.index("flat") < rows.index("down"), rows


# --------------------------------------------------------------------------- tiny zoo

CLASSES = ["cat", "dog", "emu"]


def _tiny_zoo(root, n_teachers=5):
    import timm

    from sctd_ray.data.targets import write_target
    from sctd_ray.zoo.demo import save_teacher
    from sctd_ray.zoo.store import open_store
    from sctd_ray.zoo.teacher import TeacherConfig

    zoo = open_store(str(root / "zoo"))
    for i in range(n_teachers):
        torch.manual_seed(i)
        model = timm.create_model("test_resnet", pretrained=False, num_classes=3 + i % 2, in_chans=1)
        cfg = TeacherConfig(teacher_id=f"tiny-{i}", architecture="test_resnet", num_classes=3 + i % 2,
                            label_names=[f"k{j}" for j in range(3 + i % 2)],
                            pretrained_cfg={"input_size": [1, 16, 16], "mean": [0.5], "std": [0.25],
                                            "interpolation": "bilinear", "crop_pct": 1.0},
                            num_features=int(model.num_features), model_args={"in_chans": 1})
        save_teacher(zoo, model.eval(), cfg)
    rng = np.random.default_rng(0)
    uris = []
    for name in ("task-a", "task-b"):
        uri = str(root / "elsewhere" / name)      # not under the zoo: any folder works
        imgs, labs = {}, {}
        for split, per in (("train", 4), ("val", 2), ("test", 4)):
            y = np.repeat(np.arange(3), per)
            base = rng.integers(0, 255, size=(3, 16, 16, 1))
            imgs[split] = np.clip(base[y] + rng.integers(-30, 30, size=(len(y), 16, 16, 1)), 0, 255).astype(np.uint8)
            labs[split] = [CLASSES[v] for v in y]
        write_target(open_store(uri), imgs, labs)
        uris.append(uri)
    return str(root / "zoo"), uris


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_zoo(tmp_path_factory.mktemp("bq"))


@pytest.fixture
def fake_distill(monkeypatch):
    """distill_gt replaced by a deterministic function of (teacher, target, seed); counts calls."""
    calls = []

    def fake(teacher, target, recipe, seed, method="ot"):
        calls.append((teacher.teacher_id if teacher else None, target.name, seed, method))
        tid = teacher.teacher_id if teacher else "ce"
        acc = 0.4 + 0.1 * (hash((tid, target.name)) % 5) + 0.01 * seed
        return {"test_acc": acc, "val_acc": acc, "best_epoch": 1, "seconds": 0.0}

    monkeypatch.setattr(gtm, "distill_gt", fake)
    return calls


def test_cache_hits_skip_work_and_changed_keys_recompute(tiny, tmp_path, fake_distill, monkeypatch):
    zoo, uris = tiny
    teachers = gtm.zoo_teachers(zoo)
    targets = [gtm.load_target_ref(u) for u in uris]
    cache = gtm.GTCache(tmp_path)
    from sctd_ray.distill.recipe import Recipe

    gt1, ce1 = gtm.compute_distill(teachers, targets, cache, Recipe(), seeds=(0, 1), log=lambda m: None)
    n_first = len(fake_distill)
    assert n_first == len(targets) * (len(teachers) + 1) * 2          # + ce, 2 seeds
    gt2, ce2 = gtm.compute_distill(teachers, targets, cache, Recipe(), seeds=(0, 1), log=lambda m: None)
    assert len(fake_distill) == n_first and gt1 == gt2 and ce1 == ce2  # all cache hits
    # the mean over seeds is the ground truth
    assert gt1["task-a"]["tiny-0"] == pytest.approx(
        np.mean([0.4 + 0.1 * (hash(("tiny-0", "task-a")) % 5) + 0.01 * s for s in (0, 1)]))
    # a changed recipe is a new key: everything recomputes
    gtm.compute_distill(teachers, targets[:1], cache, Recipe(epochs=3), seeds=(0,), log=lambda m: None)
    assert len(fake_distill) == n_first + len(teachers) + 1
    # a time limit of 0 uses the cache only
    before = len(fake_distill)
    gt0, _ = gtm.compute_distill(teachers, targets, cache, Recipe(), seeds=(0, 5), max_seconds=0,
                                 log=lambda m: None)
    assert len(fake_distill) == before and set(gt0) == {"task-a", "task-b"}
    # a changed recipe source (code version) is a new key too
    monkeypatch.setattr(gtm, "recipe_code_version", lambda: "changed")
    gtm.compute_distill(teachers[:1], targets[:1], cache, Recipe(), seeds=(0,), with_ce=False, log=lambda m: None)
    assert len(fake_distill) == n_first + len(teachers) + 2
    # changed teacher weights (sha256) and changed target files miss the cache as well
    k = gtm.distill_key(teachers[0], targets[0], Recipe(), 0)
    assert cache.get(k) is not None
    assert cache.get({**k, "teacher_sha256": "0" * 64}) is None
    assert cache.get({**k, "target_sha256": "0" * 64}) is None



def test_probe_cache_and_key(tiny, tmp_path, monkeypatch):
    zoo, uris = tiny
    teachers = gtm.zoo_teachers(zoo)[:2]
    targets = [gtm.load_target_ref(uris[0])]
    cache = gtm.GTCache(tmp_path)
    real = gtm.probe_gt
    calls = []
    monkeypatch.setattr(gtm, "probe_gt", lambda t, tg: calls.append(1) or real(t, tg))
    a = gtm.compute_probe(teachers, targets, cache, log=lambda m: None)
    assert len(calls) == 2 and all(0 <= v <= 1 for v in a["task-a"].values())
    b = gtm.compute_probe(teachers, targets, cache, log=lambda m: None)
    assert len(calls) == 2 and a == b
    files = list((tmp_path / "gt" / "probe").rglob("*.json"))
    assert len(files) == 2
    rec = json.loads(files[0].read_text())
    assert {"teacher_sha256", "target_sha256", "probe", "sklearn", "seed"} <= set(rec["key"])
    monkeypatch.setattr(gtm, "PROBE_SETTINGS", {**gtm.PROBE_SETTINGS, "C": 0.5})
    gtm.compute_probe(teachers, targets, cache, log=lambda m: None)
    assert len(calls) == 4


def test_probe_accuracy_on_separable_features():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 10)
    x = np.eye(3)[y] * 5 + rng.normal(size=(30, 3)) * 0.1
    assert gtm.probe_accuracy(x, y, x, y) == 1.0


def test_command_json_schema_with_arbitrary_zoo_and_targets(tiny, tmp_path, fake_distill, capsys):
    import argparse

    zoo, uris = tiny
    p = argparse.ArgumentParser()
    q.add_bench_quality_args(p)
    out_json = tmp_path / "r" / "quality.json"
    args = p.parse_args(["--zoo", zoo, "--targets", *uris, "--out", str(tmp_path / "cache"),
                         "--json", str(out_json)])
    assert q.cmd_bench_quality(args) == 0
    printed = capsys.readouterr().out
    assert "weighted Kendall tau" in printed and "task-a" in printed
    r = json.loads(out_json.read_text())
    assert r["teachers"] == 5 and r["targets"] == ["task-a", "task-b"]
    assert set(r["spread"]) == {"task-a", "task-b"}
    assert set(r["spread"]["task-a"]) == {"distill", "probe"}
    from sctd_ray.metrics import NAMES
    from sctd_ray.scores_extra import EXTRA_NAMES

    assert set(NAMES) | set(EXTRA_NAMES) | {"random"} <= set(r["metrics"])
    for m, e in r["metrics"].items():
        assert {"tau_w_mean", "tau_w_probe_mean", "regret_mean", "per_target"} <= set(e)
        assert set(e["per_target"]) == {"task-a", "task-b"}
        for row in e["per_target"].values():
            assert {"tau_w", "tau_w_probe", "regret"} <= set(row)
    # the distill numbers are the fake's, through the cache (a rerun trains nothing)
    n = len(fake_distill)
    assert n == 2 * (5 + 1)
    args2 = p.parse_args(["--zoo", zoo, "--targets", uris[0], "--out", str(tmp_path / "cache")])
    assert q.cmd_bench_quality(args2) == 0
    assert len(fake_distill) == n


def test_scores_match_the_engine(tiny):
    """score_pair's SPEC 2-3 scores are the scan engine's numbers (assess_teacher)."""
    from sctd_ray.assess.engine import assess_teacher, batches_from_arrays

    zoo, uris = tiny
    t = gtm.zoo_teachers(zoo)[0]
    tg = gtm.load_target_ref(uris[0])
    s = tg.task.splits["train"]
    ref = assess_teacher(t.get(), batches_from_arrays(tg.name, s.images, s.labels, 3), device="cpu")[tg.name]
    got = q.score_pair(t, tg)
    for m, v in ref.items():
        assert got[m] == pytest.approx(v, rel=1e-9, abs=1e-12)


# --------------------------------------------------------------------------- sctd_* variants

def _toy(seed=0, informative=True, n=24, d=12, k=5, c=3):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    mu = rng.normal(size=(c, d)) * (2.0 if informative else 0.0)
    x = mu[y] + rng.normal(size=(n, d))
    w = rng.normal(size=(k, d))
    if informative:
        w[:c] = mu
    z = x @ w.T
    p = np.exp(z - z.max(1, keepdims=True))
    return x, p / p.sum(1, keepdims=True), y, w, c


def test_loo_costs_match_brute_force():
    from sctd_ray import scores_extra as se

    x, p, y, w, c = _toy(informative=False)
    t = se.cost_terms(x, p, y, w, c, loo=True)
    wu = w / np.linalg.norm(w, axis=1, keepdims=True)
    for i in (0, 5, 17):
        for k in range(c):
            keep = (y == k) & (np.arange(len(y)) != i)
            mu = x[keep].mean(0)
            mu /= np.linalg.norm(mu)
            assert t["A"][i, k] == pytest.approx(p[i] @ (1 - wu @ mu), abs=1e-12)
            assert t["F"][i, k] == pytest.approx(1 - x[i] @ mu / np.linalg.norm(x[i]), abs=1e-12)
    t0 = se.cost_terms(x, p, y, w, c, loo=False)
    from sctd_ray.metrics import sctd
    from scipy.special import log_softmax

    want = sctd(p, y, x, w, temperature=0.1)
    got = np.mean(log_softmax(-t0["A"] / 0.1, axis=1)[np.arange(len(y)), y])
    assert got == pytest.approx(want, rel=1e-9)      # the non-LOO A is SPEC 2's A = P M


def test_loo_costs_from_probability_rows_equal_those_from_h_rows():
    """With W_unit given, loo_costs works on the rows of P (K < D) without forming h = P W_unit."""
    from sctd_ray import scores_extra as se

    x, p, y, w, c = _toy(informative=True)
    assert w.shape[0] < w.shape[1]
    wu = se.unit_rows(w)
    sums = np.zeros((c, x.shape[1]))
    np.add.at(sums, y, x)
    a_h, f_h = se.loo_costs(p @ wu, x, y, sums)
    a_p, f_p = se.loo_costs(p, x, y, sums, wu)
    np.testing.assert_allclose(a_p.numpy(), a_h.numpy(), rtol=0, atol=1e-13)
    np.testing.assert_allclose(f_p.numpy(), f_h.numpy(), rtol=0, atol=0)


def test_h_rows_takes_the_route_with_less_work():
    """A small teacher head on many samples keeps the rows of P; a 1000-class head of 2048
    features on a few-shot target forms h = P W_unit (W_unit W_unit^T alone would be 2 G)."""
    from sctd_ray import scores_extra as se

    small, p = np.eye(10, 256), np.full((2000, 10), 0.1)
    assert se.h_rows(p, small, 10)[1] is small
    wide, p = np.eye(1000, 2048), np.full((100, 1000), 1e-3)
    h, w = se.h_rows(p, wide, 5)
    assert w is None and h.shape == (100, 2048)


def test_calibrated_loglik_is_the_maximum_and_zero_without_signal():
    from scipy.special import log_softmax

    from sctd_ray import scores_extra as se

    x, p, y, w, c = _toy(seed=1, informative=False)
    t = se.cost_terms(x, p, y, w, c)
    val, beta = se.calibrated_loglik([t["A"], t["F"]], y)
    assert val >= -1e-12 and np.all(beta >= 0)

    def ll(b):
        return np.mean(log_softmax(-(b[0] * t["A"] + b[1] * t["F"]), 1)[np.arange(len(y)), y]) + np.log(c)
    assert val == pytest.approx(ll(beta), abs=1e-9)
    for db in ([0.5, 0], [0, 0.5], [-0.3, 0.2]):
        assert ll(np.clip(beta + np.array(db), 0, None)) <= val + 1e-7
    xi, pi, yi, wi, _ = _toy(seed=1, informative=True)
    assert se.sctd_fused(xi, pi, yi, wi, c) > se.sctd_fused(x, p, y, w, c)
    assert se.sctd_fused(xi, pi, yi, wi, c) <= np.log(c) + 1e-12


def test_newton_step_solve_equals_lstsq_also_when_singular():
    """The ascent's step solves ``-H s = g`` as np.linalg.lstsq would: the minimum-norm solution
    with the same cutoff, for 1 x 1 and 2 x 2 Hessians (in closed form when well conditioned),
    ill-conditioned, singular and zero ones included."""
    from sctd_ray import scores_extra as se

    rng = np.random.default_rng(3)
    a = rng.normal(size=(2, 2))
    cases = [a @ a.T, np.outer(a[0], a[0]), np.zeros((2, 2)), np.array([[2.5]]), np.zeros((1, 1)),
             np.diag([1.0, 1e-14]), np.diag([1.0, 1e-6]), np.diag([1.0, 1e-10])]   # closed form, then not
    for h in cases:
        g = rng.normal(size=h.shape[0])
        np.testing.assert_allclose(se._psd_solve(h, g), np.linalg.lstsq(h, g, rcond=1e-12)[0],
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("informative", [False, True])
def test_calibrated_loglik_on_tensors_equals_the_host_route(informative):
    """Costs as torch tensors (what a GPU's statistics hand over) give the same maximum and
    betas as numpy costs, for one and two cost terms."""
    import torch

    from sctd_ray import scores_extra as se

    x, p, y, w, c = _toy(seed=2, informative=informative)
    t = se.cost_terms(x, p, y, w, c)
    for costs in ([t["A"]], [t["A"], t["F"]]):
        val, beta = se.calibrated_loglik(costs, y)
        tval, tbeta = se.calibrated_loglik([torch.from_numpy(a) for a in costs], torch.from_numpy(y))
        assert tval == pytest.approx(val, rel=1e-10, abs=1e-12)
        np.testing.assert_allclose(tbeta, beta, rtol=1e-6, atol=1e-8)


def test_code_version_ignores_docs_and_layout_not_code():
    a = 'def f(x):\n    """Doc."""\n    # comment\n    return x + 1\n'
    b = 'def f(x):\n    """Other doc,\n    longer."""\n    return (x\n            + 1)\n'
    c = 'def f(x):\n    """Doc."""\n    return x + 2\n'
    assert gtm.normalised_source(a) == gtm.normalised_source(b)
    assert gtm.normalised_source(a) != gtm.normalised_source(c)
    assert gtm.recipe_code_version() == gtm.recipe_code_version()


def test_scores_equal_up_to_float_noise_are_ties():
    """H-score saturates at C-1 with few samples: 3.9999999999999982 vs 4.000000000000002 is a
    tie, not a ranking (tau 0, regret of a random pick among the tied)."""
    from sctd_ray.bench.quality import top1_regret, weighted_tau

    noise = [3.9999999999999982, 4.0, 4.000000000000002, 3.999999999999999]
    truth = [0.9, 0.5, 0.3, 0.6]
    assert weighted_tau(noise, truth) == 0.0
    assert abs(top1_regret(noise, truth) - 100 * (0.9 - sum(truth) / 4)) < 1e-9


@pytest.mark.parametrize("flags,match", [
    (["--recipe", "/nonexistent.json"], "--recipe /nonexistent.json: No such file"),
    (["--recipe", "/etc/hostname"], "not a JSON object of Recipe settings"),
    (["--recipe", "{epochs: 3}"], "not a JSON object of Recipe settings"),
    (["--recipe", '{"epochz": 3}'], "epochz"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--teachers-per-target", "0"], "--teachers-per-target must be at least 1"),
    (["--distill-max-seconds", "-5"], "--distill-max-seconds must be 0 or more"),
    (["--json", "/proc/nope/x.json"], "--json /proc/nope/x.json: cannot create its folder"),
])
def test_bad_options_are_one_line_before_any_work(tmp_path, monkeypatch, capsys, flags, match):
    from sctd_ray.cli import main

    monkeypatch.setattr(q, "run_quality", lambda *a, **k: pytest.fail("the benchmark ran"))
    code = main(["bench", "quality", "--zoo", str(tmp_path / "zoo"), "--out", str(tmp_path / "c"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], err


def test_recipe_is_json_as_for_distill_or_a_file(tmp_path):
    (tmp_path / "r.json").write_text('{"epochs": 3}')
    assert q._recipe('{"epochs": 3}').epochs == 3 == q._recipe(str(tmp_path / "r.json")).epochs
    assert q._recipe("default").to_dict() == q._recipe("{}").to_dict()
