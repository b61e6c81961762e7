"""Train one student on a target task (SPEC 4), with or without a teacher; no Ray here.

    L = CE(s(x), y) [labelled views] + lam * mean_i W_eps(p_t(x_i; tau), softmax(s(x_i)/tau); M) [all views]

``M`` is the teacher's proto-cos cost (SPEC 1) from its features on the non-augmented training
images and its classifier weight, computed once. On every step the teacher runs online on the
same augmented views as the student (``views.make_views``). ``kd`` replaces the OT term by
Hinton KD and needs the teacher's label names to equal the target's; ``ce`` uses no teacher.

Validation accuracy is measured after every epoch; the student with the best validation
accuracy (ties: lower validation loss) is kept and its test accuracy measured, so a run that is
stopped early still has the test accuracy of its best-validation checkpoint. With a
``checkpoint_dir`` the full training state is saved after every epoch and a run resumes from it
exactly (same seed, same machine: same numbers).

A training step reads nothing back to the host, so on a GPU the host queues step after step
without waiting: the OT loss runs a fixed number of Sinkhorn iterations on a cost prepared once
(``ot.prepare_cost``), labelled views are a host-known slice, per-step host tensors reach the
device through pinned memory, and the loss is summed on the device and read once per epoch.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..data.preprocess import Preprocessing
from ..errors import SctdError
from ..ot import prepare_cost
from ..zoo.teacher import TeacherConfig
from .recipe import DEFAULT_STUDENT, Recipe, check_hp, check_student
from .views import BatchSampler, lr_at, make_views, to_device
STATE_FILE = "state.pt"
BEST_FILE = "best.safetensors"
STUDENT_FILE = "student.json"
# the epoch a checkpoint holds, as reported: Tune may stop a search between a trial's checkpoint
# and its report reaching the driver, and the search then reads the result from here
METRICS_FILE = "metrics.json"
EVAL_BATCH = 256

Report = Callable[[int, dict], None]


@dataclass
class TrainResult:
    """What a run produced: accuracies of the best-validation student, its weights, its config
    (timm hub layout, the target's class names as label names) and the validation curve."""

    method: str
    teacher_id: str | None
    hp: dict
    val_acc: float
    test_acc: float
    best_epoch: int
    epochs: int
    val_curve: list[float]
    seconds: float
    model: torch.nn.Module
    config: TeacherConfig
    history: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- pieces


def student_preprocessing(target, max_side: int = Recipe.student_max_side) -> tuple[Preprocessing, dict]:
    """The student's own input normalisation: the target's decoded size (each side at most
    ``max_side``; images are resized to it), per-channel mean and std of its training images
    (returned also as a ``pretrained_cfg`` dict)."""
    imgs = target.splits["train"].images
    n, h, w, c = imgs.shape
    h, w = min(h, max_side), min(w, max_side)
    x = imgs.reshape(-1, c).astype(np.float64) / 255.0
    mean = [round(float(v), 4) for v in x.mean(0)]
    std = [round(max(float(v), 1e-3), 4) for v in x.std(0)]
    cfg = {"input_size": [int(c), int(h), int(w)], "mean": mean, "std": std,
           "interpolation": "bilinear", "crop_pct": 1.0}
    return Preprocessing.from_pretrained_cfg(cfg), cfg


def fitted_to_student(target, pre: Preprocessing):
    """The target with every split's images resized once to the student's input size when
    they are larger (uint8, antialiased bilinear as ``Preprocessing.resize``): views are made,
    and the teacher run, at the student's size, not the decoded one (photos: up to 512 px)."""
    from ..data.targets import TargetSplit, TargetTask

    _, h, w = pre.input_size
    n, height, width, c = target.splits["train"].images.shape
    if (height, width) == (h, w):
        return target
    geometry = Preprocessing((c, h, w), (0.5,) * c, (0.5,) * c, pre.interpolation)
    splits = {}
    for name, sp in target.splits.items():
        x = geometry.resize(torch.from_numpy(sp.images))
        x = x.mul_(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        splits[name] = TargetSplit(x.numpy(), sp.labels)
    return TargetTask(target.name, target.uri, target.class_names, splits)


def build_student(target, architecture: str = DEFAULT_STUDENT, model_args: dict | None = None,
                  seed: int = 0, max_side: int = Recipe.student_max_side,
                  ) -> tuple[torch.nn.Module, TeacherConfig, Preprocessing]:
    """A fresh timm student with C outputs and the target's channel count (seeded init)."""
    import timm

    check_student(architecture)
    pre, pcfg = student_preprocessing(target, max_side)
    args = {"in_chans": pcfg["input_size"][0], **(model_args or {})}
    torch.manual_seed(seed)
    try:
        model = timm.create_model(architecture, pretrained=False, num_classes=target.num_classes, **args)
        with torch.no_grad():
            model(torch.zeros(2, *pcfg["input_size"]))
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:
        raise SctdError(f"student {architecture!r} does not work on {tuple(pcfg['input_size'])} "
                        f"inputs: {str(e).splitlines()[0]}") from None
    cfg = TeacherConfig(teacher_id="student", architecture=architecture,
                        num_classes=target.num_classes, label_names=list(target.class_names),
                        pretrained_cfg=pcfg, num_features=int(getattr(model, "num_features", 0)) or None,
                        model_args=args)
    return model, cfg, pre


def teacher_cost(runner, target, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """SPEC 1 proto-cos M (K, C): teacher features of the non-augmented training images and
    the teacher's classifier weight."""
    from ..ot import ground_cost

    split = target.splits["train"]
    feats = []
    for i in range(0, len(split), batch_size):
        f, _ = runner.forward(torch.from_numpy(split.images[i:i + batch_size]))
        feats.append(f.float().clone())
    labels = torch.from_numpy(split.labels).to(runner.device)
    weight = runner.weight.float()
    return ground_cost(torch.cat(feats), labels, weight, kind="proto-cos",
                       num_classes=target.num_classes).float()


def kd_index(teacher, class_names: list[str]) -> torch.Tensor:
    """Column of the teacher's logits for each target class; SctdError unless the teacher's
    label names are the target's class names (any order)."""
    names = list(teacher.config.label_names)
    if sorted(names) != sorted(class_names) or len(set(names)) != len(names):
        raise SctdError(f"kd needs the teacher's label names to equal the target's class names: "
                        f"teacher {teacher.teacher_id!r} has {names}, the target has "
                        f"{list(class_names)}; use --method ot across label spaces")
    return torch.tensor([names.index(c) for c in class_names], dtype=torch.long)


@torch.no_grad()
def evaluate(model, pre: Preprocessing, images: np.ndarray, labels: np.ndarray,
             device: torch.device) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on non-augmented images."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(labels), EVAL_BATCH):
        x = pre(torch.from_numpy(images[i:i + EVAL_BATCH]).to(device))
        y = torch.from_numpy(labels[i:i + EVAL_BATCH]).to(device)
        out = model(x).float()
        correct += int((out.argmax(1) == y).sum())
        loss += float(F.cross_entropy(out, y, reduction="sum"))
    model.train()
    return correct / len(labels), loss / len(labels)


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _save_weights(model, path: str) -> None:
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)


def _load_weights(model, path: str) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(path), strict=True)


# --------------------------------------------------------------------------- training

def train_student(target, teacher, method: str, hp: dict | None = None, recipe: Recipe | None = None,
                  seed: int = 0, report: Report | None = None, checkpoint_dir: str | None = None,
                  student: str = DEFAULT_STUDENT, student_args: dict | None = None,
                  device: str | torch.device | None = None) -> TrainResult:
    """Train a student on ``target`` (a TargetTask with train/val/test splits) by ``method``
    ("ot", "kd", "ce"; SPEC 4) with hyper-parameters ``hp`` (lam, tau, eps, lr).

    ``report(epoch, metrics)`` is called after every epoch (after the checkpoint is written),
    with ``val_acc``/``test_acc`` of the best-validation student so far, ``best_epoch``,
    ``best_val_loss``, ``epoch_val_acc``, ``val_loss``, ``train_loss``, ``seconds`` (training
    time over all sessions), ``resumed_epoch`` (where this session started) and ``finished``.
    A run resumed from its final checkpoint reports its last epoch again and trains no more.
    """
    from ..assess.engine import TeacherRunner

    recipe = recipe or Recipe()
    recipe.validate()
    hp = check_hp(method, hp or {})
    for s in ("train", "val", "test"):
        if s not in target.splits:
            raise SctdError(f"target {target.name!r} has no {s!r} split; distillation needs train, val and test")
    if method in ("ot", "kd") and teacher is None:
        raise SctdError(f"method {method!r} needs a teacher")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher_id = teacher.teacher_id if (teacher is not None and method != "ce") else None
    kd_cols = kd_index(teacher, target.class_names).to(device) if method == "kd" else None

    model, cfg, pre = build_student(target, student, student_args, seed, recipe.student_max_side)
    target = fitted_to_student(target, pre)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=recipe.weight_decay)
    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    train = target.splits["train"]
    x_train = torch.from_numpy(train.images)
    y_train = torch.from_numpy(train.labels)
    sampler = BatchSampler(len(y_train), recipe.batch_size, gen)

    runner = m_cost = None
    if method in ("ot", "kd"):
        runner = TeacherRunner(teacher, device)
        if method == "ot":
            # checked once, kernel built once: the per-step OT loss reads nothing back (SPEC 4)
            m_cost = prepare_cost(teacher_cost(runner, target), hp["eps"], device=device)

    meta = {"method": method, "teacher_id": teacher_id, "hp": hp, "seed": seed,
            "recipe": recipe.to_dict(), "student": student, "target": target.name}
    start_epoch, best, curve, history, seconds = 0, None, [], [], 0.0
    state_path = os.path.join(checkpoint_dir, STATE_FILE) if checkpoint_dir else None
    if state_path and os.path.exists(state_path):
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if json.loads(state["meta"]) != json.loads(json.dumps(meta)):
            raise SctdError(f"checkpoint in {checkpoint_dir} belongs to another run: "
                            f"{state['meta']} vs {json.dumps(meta)}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        sampler.load(state["queue"])
        start_epoch, best = int(state["epoch"]), json.loads(state["best"])
        curve, history, seconds = list(state["curve"]), json.loads(state["history"]), float(state["seconds"])
    if checkpoint_dir:
        os.makedirs(checkpoint_dir, exist_ok=True)
        with open(os.path.join(checkpoint_dir, STUDENT_FILE), "w") as f:
            f.write(cfg.to_json())

    smoothing = recipe.label_smoothing
    tau, lam, eps = hp["tau"], hp["lam"], hp["eps"]
    mix = method != "ce" or recipe.ce_mix == "labels"
    best_state = None
    for epoch in range(start_epoch, recipe.epochs):
        t0 = time.time()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # read once per epoch
        for i in range(recipe.steps_per_epoch):
            step = epoch * recipe.steps_per_epoch + i
            for g in opt.param_groups:
                g["lr"] = lr_at(step, recipe, hp["lr"])
            idx = sampler.next()
            v = make_views(to_device(x_train[idx], device), y_train[idx], recipe, gen, mix=mix)
            logits = model(pre(v.x))
            loss = _loss(method, logits, v, runner, m_cost, kd_cols, tau, lam, eps, smoothing,
                         recipe.sinkhorn_iters)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
        val_acc, val_loss = evaluate(model, pre, target.splits["val"].images, target.splits["val"].labels, device)
        curve.append(val_acc)
        if best is None or (val_acc, -val_loss) > (best["val_acc"], -best["val_loss"]):
            test_acc, _ = evaluate(model, pre, target.splits["test"].images, target.splits["test"].labels, device)
            best = {"val_acc": val_acc, "val_loss": val_loss, "test_acc": test_acc, "epoch": epoch + 1}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if checkpoint_dir:
                _save_weights(model, os.path.join(checkpoint_dir, BEST_FILE))
        seconds += time.time() - t0
        metrics = {"epoch": epoch + 1, "val_acc": best["val_acc"], "test_acc": best["test_acc"],
                   "best_epoch": best["epoch"], "best_val_loss": best["val_loss"],
                   "epoch_val_acc": val_acc, "val_loss": val_loss,
                   "train_loss": float(loss_sum) / recipe.steps_per_epoch, "seconds": round(seconds, 3),
                   "resumed_epoch": start_epoch, "finished": epoch + 1 == recipe.epochs}
        history.append(metrics)
        if state_path:
            _atomic_save({"meta": json.dumps(meta), "epoch": epoch + 1, "model": model.state_dict(),
                          "optimizer": opt.state_dict(), "gen": gen.get_state(),
                          "torch_rng": torch.get_rng_state(), "queue": sampler.state(),
                          "best": json.dumps(best), "curve": curve, "history": json.dumps(history),
                          "seconds": seconds}, state_path)
        if checkpoint_dir:
            _atomic_write_text(os.path.join(checkpoint_dir, METRICS_FILE),
                               json.dumps({"last": metrics, "curve": [float(v) for v in curve]}))
        if report is not None:
            report(epoch + 1, dict(metrics))

    if start_epoch >= recipe.epochs and history and report is not None:
        # resumed from the final checkpoint (e.g. the driver died before recording the end):
        # report the final result again instead of training more
        report(recipe.epochs, {**history[-1], "resumed_epoch": start_epoch})
    if best_state is not None:
        model.load_state_dict(best_state)
    elif checkpoint_dir and os.path.exists(os.path.join(checkpoint_dir, BEST_FILE)):
        _load_weights(model, os.path.join(checkpoint_dir, BEST_FILE))
    model.eval()
    return TrainResult(method=method, teacher_id=teacher_id, hp=hp, val_acc=best["val_acc"],
                       test_acc=best["test_acc"], best_epoch=best["epoch"], epochs=recipe.epochs,
                       val_curve=curve, seconds=seconds, model=model, config=cfg, history=history)


def _loss(method, logits, v, runner, m_cost, kd_cols, tau, lam, eps, smoothing, iters):
    """SPEC 4: CE on labelled views + lam * distillation term on all views."""
    from .losses import kd_loss, ot_distill_loss

    lab = v.labelled
    if method == "ce":
        if v.n_mixed:  # mixup targets on mixed views (recipe.ce_mix == "labels")
            a = F.cross_entropy(logits, v.labels, label_smoothing=smoothing, reduction="none")
            b = F.cross_entropy(logits, v.partner, label_smoothing=smoothing, reduction="none")
            return (v.weight * a + (1 - v.weight) * b).mean()
        return F.cross_entropy(logits, v.labels, label_smoothing=smoothing)
    ce = F.cross_entropy(logits[lab], v.labels[lab], label_smoothing=smoothing) \
        if v.n_mixed < len(v.labels) else logits.sum() * 0.0
    if lam == 0:
        return ce
    _, t_logits = runner.forward(v.x)
    t_logits = t_logits.clone()  # a normal tensor, out of inference mode
    if method == "kd":
        return ce + lam * kd_loss(logits, t_logits[:, kd_cols], tau)
    p_t = torch.softmax(t_logits / tau, dim=1)
    return ce + lam * ot_distill_loss(logits, p_t, m_cost, tau, eps, max_iter=iters, tol=0.0)
