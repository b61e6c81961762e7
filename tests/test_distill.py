"""The distillation training core (SPEC 4): views, losses wiring, kd refusal, reproducibility,
checkpoint resume, budget parsing and the trial plan. Synthetic tasks and teachers: fast."""

import json

import numpy as np
import pytest
import timm
import torch

from sctd_ray.data.preprocess import Preprocessing
from sctd_ray.data.targets import TargetSplit, TargetTask
from sctd_ray.distill import train as train_mod
from sctd_ray.distill.recipe import DEFAULT_HP, Recipe, check_hp
from sctd_ray.distill.views import make_views
from sctd_ray.distill.search import SEARCH_SPACE, parse_budget, plan_trials
from sctd_ray.distill.train import kd_index, train_student
from sctd_ray.errors import SctdError
from sctd_ray.zoo.loading import LoadedTeacher
from sctd_ray.zoo.teacher import TeacherConfig

TINY = Recipe(epochs=2, steps_per_epoch=3, batch_size=8, warmup_steps=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster than two, and much faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_target(classes=("a", "b", "c"), per=6, size=12, seed=0) -> TargetTask:
    """Class c is a bright square at a class-specific place: learnable, and augmentations move it."""
    rng = np.random.default_rng(seed)

    def split(n):
        imgs, labels = [], []
        for c in range(len(classes)):
            for _ in range(n):
                im = rng.integers(0, 40, (size, size, 1)).astype(np.uint8)
                o = 2 + 3 * c
                im[o:o + 3, o:o + 3] = 230
                imgs.append(im)
                labels.append(c)
        return TargetSplit(np.stack(imgs), np.array(labels, dtype=np.int64))

    return TargetTask("syn", "/nowhere/syn", list(classes),
                      {"train": split(per), "val": split(3), "test": split(4)})


def make_teacher(labels=("x", "y", "z", "w"), size=16, channels=3, seed=1) -> LoadedTeacher:
    """A teacher with another input size, channel count and normalisation than the target."""
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=len(labels), in_chans=channels).eval()
    pcfg = {"input_size": [channels, size, size], "mean": [0.4] * channels, "std": [0.2] * channels}
    cfg = TeacherConfig("syn-teacher", "test_resnet", len(labels), list(labels), pcfg,
                        model_args={"in_chans": channels})
    return LoadedTeacher(cfg, model, Preprocessing.from_pretrained_cfg(pcfg))


def first_conv(model):
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))


# --------------------------------------------------------------------------- views

def test_teacher_and_student_see_the_same_augmented_views(monkeypatch):
    target, teacher = make_target(), make_teacher()
    seen_t, seen_s, students = [], [], []
    first_conv(teacher.model).register_forward_pre_hook(lambda m, a: seen_t.append(a[0].detach().clone()))
    original = train_mod.build_student

    def spy(*a, **k):
        model, cfg, pre = original(*a, **k)
        model.register_forward_pre_hook(
            lambda m, args: seen_s.append(args[0].detach().clone()) if m.training else None)
        students.append(pre)
        return model, cfg, pre

    monkeypatch.setattr(train_mod, "build_student", spy)
    train_student(target, teacher, "ot", {"lam": 1.0}, TINY, seed=3, device="cpu")
    pre = students[0]
    steps = TINY.total_steps
    assert len(seen_s) == steps
    # the first teacher call computes M on the plain training images; then one per step
    assert len(seen_t) == 1 + steps
    mean = torch.tensor(pre.mean).view(1, -1, 1, 1)
    std = torch.tensor(pre.std).view(1, -1, 1, 1)
    plain = pre(torch.from_numpy(target.splits["train"].images))
    for s_in, t_in in zip(seen_s, seen_t[1:]):
        views = s_in * std + mean                       # the float [0, 1] views themselves
        assert views.min() >= -1e-5 and views.max() <= 1 + 1e-5
        torch.testing.assert_close(teacher.preprocessing(views), t_in, rtol=1e-4, atol=1e-4)
        # and they are augmented views, not the training images
        assert not any(torch.allclose(s_in[0], p, atol=1e-3) for p in plain)


def test_views_mix_part_of_the_batch_and_keep_labels():
    target = make_target()
    x = torch.from_numpy(target.splits["train"].images[:10])
    y = torch.from_numpy(target.splits["train"].labels[:10])
    rec = Recipe(mix_frac=0.4)
    v1 = make_views(x, y, rec, torch.Generator().manual_seed(5))
    v2 = make_views(x, y, rec, torch.Generator().manual_seed(5))
    torch.testing.assert_close(v1.x, v2.x)              # seeded: reproducible
    assert v1.mixed.tolist() == [True] * 4 + [False] * 6
    assert torch.equal(v1.labels, y) and v1.x.shape == (10, 1, 12, 12)
    assert bool((v1.weight[:4] < 1).all()) and bool((v1.weight[4:] == 1).all())
    # no augmentation and no mixing: the views are the images
    rec0 = Recipe(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), translate=0.0, rotate=0.0, mix_frac=0.0)
    v0 = make_views(x, y, rec0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(v0.x, x.permute(0, 3, 1, 2).float() / 255, atol=1e-5, rtol=0)
    assert not bool(v0.mixed.any())


# --------------------------------------------------------------------------- methods

def test_kd_refused_names_the_teachers_that_would_do(monkeypatch):
    """kd over a top-k where only some teachers share the target's label names: the line says
    how many differ and which --teacher flags would run."""
    from types import SimpleNamespace

    from sctd_ray.distill.search import _check_kd

    labels = {"same": ["b", "a"], "x1": ["x", "y"], "x2": ["p", "q"]}
    monkeypatch.setattr("sctd_ray.zoo.loading.read_config",
                        lambda zoo, t: SimpleNamespace(label_names=labels[t]))
    with pytest.raises(SctdError, match=r"teacher 'x1' has .*\(2 of 3 teachers differ\); use --method ot; "
                                        r"of these, --teacher same would do"):
        _check_kd(None, ["x1", "same", "x2"], ["a", "b"])
    _check_kd(None, ["same"], ["a", "b"])


def test_kd_is_refused_for_other_label_names_and_mapped_by_name():
    target = make_target(("a", "b", "c"))
    with pytest.raises(SctdError, match="kd needs the teacher's label names"):
        train_student(target, make_teacher(("x", "y", "z", "w")), "kd", {}, TINY, device="cpu")
    with pytest.raises(SctdError, match="kd needs"):
        kd_index(make_teacher(("a", "b")), ["a", "b", "c"])
    perm = make_teacher(("c", "a", "b"))
    assert kd_index(perm, ["a", "b", "c"]).tolist() == [1, 2, 0]
    res = train_student(target, perm, "kd", {"lam": 1.0}, TINY, device="cpu")
    assert res.method == "kd" and res.teacher_id == "syn-teacher"


def test_ot_needs_a_teacher_and_uses_it():
    target = make_target()
    with pytest.raises(SctdError, match="needs a teacher"):
        train_student(target, None, "ot", {}, TINY, device="cpu")
    one = Recipe(epochs=1, steps_per_epoch=2, batch_size=8, warmup_steps=1)
    a = train_student(target, make_teacher(seed=1), "ot", {"lam": 1.0}, one, seed=0, device="cpu")
    b = train_student(target, make_teacher(seed=2), "ot", {"lam": 1.0}, one, seed=0, device="cpu")
    c = train_student(target, make_teacher(seed=2), "ot", {"lam": 0.0}, one, seed=0, device="cpu")
    d = train_student(target, None, "ce", {}, Recipe(**{**one.to_dict(), "crop_scale": (0.35, 1.0),
                                                       "crop_ratio": (0.75, 1.3333), "ce_mix": "none"}),
                      seed=0, device="cpu")
    wa, wb, wc = (next(r.model.parameters()).detach() for r in (a, b, c))
    assert not torch.equal(wa, wb)                    # the teacher changes the student
    assert not torch.equal(wb, wc)                    # ... through the OT term
    assert d.teacher_id is None and c.teacher_id == "syn-teacher"


def test_bad_hyper_parameters_and_recipe_are_user_errors():
    with pytest.raises(SctdError, match="tau must be a positive"):
        check_hp("ot", {"tau": 0})
    with pytest.raises(SctdError, match="unknown hyper-parameter"):
        check_hp("ot", {"beta": 1})
    with pytest.raises(SctdError, match="unknown method"):
        check_hp("xx", {})
    with pytest.raises(SctdError, match="unknown recipe setting"):
        Recipe.from_dict({"epochz": 3})
    assert Recipe.from_dict(Recipe().to_dict()) == Recipe()


@pytest.mark.parametrize("setting, needle", [
    ({"epochs": "a"}, "epochs must be an integer"), ({"epochs": 1.5}, "epochs must be an integer"),
    ({"batch_size": True}, "batch_size must be an integer"),
    ({"student_max_side": None}, "student_max_side must be an integer"),
    ({"crop_scale": 5}, "crop_scale must be a pair"), ({"crop_scale": [0.5]}, "crop_scale must be a pair"),
    ({"crop_ratio": [2, 1]}, "crop_ratio must satisfy"), ({"rotate": float("inf")}, "rotate must be a number"),
    ({"hflip": "no"}, "hflip must be true or false"), ({"ce_mix": 5}, "ce_mix must be a string"),
    ({"label_smoothing": 2}, "label_smoothing must lie"), ({"weight_decay": -1}, "weight_decay must not be"),
])
def test_a_recipe_setting_of_the_wrong_type_or_range_is_a_user_error(setting, needle):
    """``--recipe`` is JSON typed by a user: a wrong type or value is one line before any
    trial (was a traceback, or an error in every trial)."""
    with pytest.raises(SctdError, match=needle):
        Recipe.from_dict(setting)
    assert Recipe.from_dict({"epochs": 2.0, "crop_scale": [0.5, 1]}) == Recipe(epochs=2, crop_scale=(0.5, 1.0))


# --------------------------------------------------------------------------- reproducibility

def test_same_seed_same_student_and_checkpoint_resume_is_exact(tmp_path):
    target, teacher = make_target(), make_teacher()
    rec = Recipe(epochs=3, steps_per_epoch=2, batch_size=8, warmup_steps=2)
    full = train_student(target, teacher, "ot", {"lam": 1.0}, rec, seed=7, device="cpu")
    again = train_student(target, teacher, "ot", {"lam": 1.0}, rec, seed=7, device="cpu")
    assert full.val_curve == again.val_curve and full.history[-1]["train_loss"] == again.history[-1]["train_loss"]

    class Crash(Exception):
        pass

    def crash_after_two(epoch, metrics):
        if epoch == 2:
            raise Crash()

    ckpt = tmp_path / "ckpt"
    with pytest.raises(Crash):
        train_student(target, teacher, "ot", {"lam": 1.0}, rec, seed=7, report=crash_after_two,
                      checkpoint_dir=str(ckpt), device="cpu")
    reports = []
    resumed = train_student(target, teacher, "ot", {"lam": 1.0}, rec, seed=7, checkpoint_dir=str(ckpt),
                            report=lambda e, m: reports.append((e, m)), device="cpu")
    assert [e for e, _ in reports] == [3] and reports[0][1]["resumed_epoch"] == 2
    assert resumed.val_curve == full.val_curve
    assert resumed.history[-1]["train_loss"] == full.history[-1]["train_loss"]
    for p, q in zip(resumed.model.state_dict().values(), full.model.state_dict().values()):
        assert torch.equal(p, q)
    # the checkpoint belongs to this run only
    with pytest.raises(SctdError, match="belongs to another run"):
        train_student(target, teacher, "ot", {"lam": 2.0}, rec, seed=7, checkpoint_dir=str(ckpt), device="cpu")
    # a finished run re-reports its last epoch instead of training again
    again_reports = []
    train_student(target, teacher, "ot", {"lam": 1.0}, rec, seed=7, checkpoint_dir=str(ckpt),
                  report=lambda e, m: again_reports.append((e, m)), device="cpu")
    assert [e for e, _ in again_reports] == [3] and again_reports[0][1]["resumed_epoch"] == 3


def test_student_config_has_the_targets_labels_and_preprocessing():
    target = make_target(("cat", "dog", "eel"))
    res = train_student(target, None, "ce", {}, TINY, device="cpu")
    cfg = json.loads(res.config.to_json())
    assert cfg["label_names"] == ["cat", "dog", "eel"] and cfg["num_classes"] == 3
    assert cfg["pretrained_cfg"]["input_size"] == [1, 12, 12]
    assert 0 <= res.test_acc <= 1 and len(res.val_curve) == TINY.epochs


# --------------------------------------------------------------------------- search helpers

@pytest.mark.parametrize("text,seconds", [("600", 600), ("90s", 90), ("10m", 600), ("1h", 3600),
                                          ("1h30m", 5400), ("2.5m", 150)])
def test_parse_budget(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "-5", "0", "10x", "m"])
def test_parse_budget_rejects(text):
    with pytest.raises(SctdError, match="budget"):
        parse_budget(text)


def test_plan_puts_the_baseline_and_every_teacher_in_each_round():
    plans = plan_trials(["t1", "t2"], "ot", samples=3, seed=0)
    assert [(p["teacher_id"], p["method"], p["sample"]) for p in plans[:3]] == \
        [(None, "ce", 0), ("t1", "ot", 0), ("t2", "ot", 0)]
    assert len(plans) == 9 and len({p["trial_id"] for p in plans}) == 9
    assert all(p["hp"] == DEFAULT_HP and p["protected"] for p in plans[:3])
    assert not any(p["protected"] for p in plans[3:])
    for p in plans[3:]:
        for k, (lo, hi) in SEARCH_SPACE.items():
            if p["method"] == "ot" or k == "lr":
                assert lo * 0.99 <= p["hp"][k] <= hi * 1.01
    assert plans == plan_trials(["t1", "t2"], "ot", samples=3, seed=0)
    assert plans != plan_trials(["t1", "t2"], "ot", samples=3, seed=1)
    assert [p["method"] for p in plan_trials(["t1"], "ce", 2, 0)] == ["ce", "ce"]


@pytest.mark.parametrize("method", ["ce", "ot", "kd"])
def test_a_training_step_reads_nothing_back_to_the_host(method, no_host_reads):
    """Views, student, teacher, loss and backward of one step queue work without reading a
    value back into Python: on a GPU, no step waits for the device (SPEC 4's cost goal)."""
    from sctd_ray.assess.engine import TeacherRunner
    from sctd_ray.ot import prepare_cost

    target = make_target(("a", "b", "c"))
    teacher = make_teacher(("c", "a", "b") if method == "kd" else ("x", "y", "z", "w"))
    model, _, pre = train_mod.build_student(target, train_mod.DEFAULT_STUDENT, None, 0)
    runner = TeacherRunner(teacher, "cpu")
    cost = prepare_cost(train_mod.teacher_cost(runner, target), 0.1) if method == "ot" else None
    kd_cols = kd_index(teacher, target.class_names) if method == "kd" else None
    x = torch.from_numpy(target.splits["train"].images[:8])
    y = torch.from_numpy(target.splits["train"].labels[:8])
    with no_host_reads():
        v = make_views(x, y, TINY, torch.Generator().manual_seed(0))
        loss = train_mod._loss(method, model(pre(v.x)), v, runner if method != "ce" else None,
                               cost, kd_cols, 2.0, 1.0, 0.1, 0.1, 20)
        loss.backward()
    assert v.n_mixed == 4 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_the_student_input_is_at_most_the_recipes_side(monkeypatch):
    """A target decoded larger than the recipe's ``student_max_side`` (photos: up to 512 px)
    trains a student at that side: the views are made from images resized once to it, and the
    exported config says so."""
    target = make_target(size=24)
    small = Recipe.from_dict({**TINY.to_dict(), "student_max_side": 16})
    shapes, real = [], train_mod.make_views
    monkeypatch.setattr(train_mod, "make_views", lambda x, *a, **k: shapes.append(tuple(x.shape)) or real(x, *a, **k))
    res = train_student(target, None, "ce", recipe=small)
    assert shapes and all(s[1:] == (16, 16, 1) for s in shapes)
    assert res.config.pretrained_cfg["input_size"] == [1, 16, 16]
    assert res.val_acc is not None
    assert train_mod.build_student(target, train_mod.DEFAULT_STUDENT)[1].pretrained_cfg["input_size"] == [1, 24, 24]
    with pytest.raises(SctdError, match="student_max_side"):
        Recipe.from_dict({"student_max_side": 4})


def test_a_budget_too_small_for_an_epoch_says_what_to_change():
    from sctd_ray.distill.search import format_summary

    summary = {"target": "t", "trials": 2, "trials_by_status": {"not_run": 2}, "used_s": 59.0,
               "budget_s": 60.0, "complete": True, "stopped_by_budget": True, "best": None,
               "ce_baseline": None, "teachers": []}
    text = format_summary(summary)
    assert "none finished an epoch" in text and "student_max_side" in text and "--budget" in text


@pytest.mark.parametrize("target", ["digits..v2", "fm...mix5", "html <b>t & 'q' \"d\"", "猫", "a" * 200])
def test_a_students_id_is_valid_whatever_the_targets_folder_name(target):
    """A target folder named `digits..v2` distilled for the whole budget, then failed the
    export: 'invalid teacher id student-digits..v2-from-ce-...' (exit 2, no summary, no report)."""
    from sctd_ray.distill.export import student_id
    from sctd_ray.zoo.teacher import check_teacher_id

    sid = student_id(target, "X.odd_id-1.0", "s3://bucket/run/distill")
    assert check_teacher_id(sid) == sid and sid.startswith("student-")
    assert student_id(target, "ce", "a") != student_id(target, "ce", "b")
