"""The demo zoo and targets, built from real data (Fashion-MNIST, scikit-learn digits).

Teachers are small timm architectures trained here on different class subsets and domains
(plain, inverted, rotated) of the two datasets, so some are close to a target and others are
not. Targets are few-shot tasks drawn from images no teacher was trained on. Everything is
deterministic for a seed on one machine.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data.preprocess import Preprocessing
from ..data.sources import DIGIT_CLASSES, FASHION_CLASSES, apply_domain, digits, fashion_mnist
from ..data.targets import write_target
from .teacher import TeacherConfig, config_key, weights_key

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FM_STATS = ((0.286,), (0.353,))
DIGIT_STATS = ((0.305,), (0.376,))

# name -> (timm architecture, model_args, input_size); the mean/std follow the data for grey
# teachers and ImageNet's convention for RGB ones, as real zoos mix both.
ARCHS = {
    "resnet": ("test_resnet", {"in_chans": 1}, (1, 28, 28)),
    "effnet": ("test_efficientnet", {"in_chans": 3}, (3, 32, 32)),
    "byob": ("test_byobnet", {"in_chans": 3}, (3, 32, 32)),
    "vit": ("test_vit", {"in_chans": 1, "img_size": 32, "patch_size": 8}, (1, 32, 32)),
    "mamba": ("test_mambaout", {"in_chans": 1}, (1, 32, 32)),
    "nfnet": ("test_nfnet", {"in_chans": 3}, (3, 32, 32)),
}

FM = {
    "all": FASHION_CLASSES,
    "tops": ("T-shirt/top", "Pullover", "Dress", "Coat", "Shirt"),
    "misc": ("Trouser", "Bag", "Sandal", "Sneaker", "Ankle boot"),
    "feet": ("Sandal", "Sneaker", "Ankle boot"),
    "upper": ("Pullover", "Coat", "Shirt"),
    "bottoms": ("Trouser", "Dress", "Bag"),
}
DG = {
    "all": DIGIT_CLASSES,
    "low": DIGIT_CLASSES[:5],
    "high": DIGIT_CLASSES[5:],
    "even": DIGIT_CLASSES[0::2],
    "odd": DIGIT_CLASSES[1::2],
}


@dataclass(frozen=True)
class TaskSpec:
    """A task on one dataset: ``fm`` (Fashion-MNIST) or ``dg`` (digits), classes, domain."""

    dataset: str
    subset: str
    domain: str

    @property
    def classes(self) -> tuple[str, ...]:
        return (FM if self.dataset == "fm" else DG)[self.subset]

    @property
    def slug(self) -> str:
        dom = "" if self.domain == "plain" else f"-{self.domain[:3]}"
        return f"{self.dataset}{dom}-{self.subset}"


@dataclass(frozen=True)
class TeacherSpec:
    task: TaskSpec
    arch: str

    @property
    def teacher_id(self) -> str:
        return f"{self.task.slug}-{self.arch}"


def _t(ds, subset, domain, arch):
    return TeacherSpec(TaskSpec(ds, subset, domain), arch)


SMALL_TEACHERS = [
    _t("fm", "all", "plain", "resnet"), _t("fm", "tops", "plain", "effnet"),
    _t("fm", "misc", "plain", "byob"), _t("fm", "all", "inverted", "vit"),
    _t("fm", "all", "rot90", "effnet"), _t("dg", "all", "plain", "resnet"),
    _t("dg", "low", "plain", "mamba"), _t("dg", "all", "inverted", "nfnet"),
]
BENCH_TEACHERS = SMALL_TEACHERS + [
    _t("fm", "feet", "plain", "mamba"), _t("fm", "upper", "plain", "vit"),
    _t("fm", "bottoms", "plain", "nfnet"), _t("fm", "tops", "inverted", "resnet"),
    _t("fm", "misc", "inverted", "effnet"), _t("fm", "tops", "rot90", "mamba"),
    _t("fm", "misc", "rot90", "resnet"), _t("fm", "all", "flip", "byob"),
    _t("dg", "high", "plain", "effnet"), _t("dg", "even", "plain", "byob"),
    _t("dg", "odd", "plain", "vit"), _t("dg", "low", "inverted", "resnet"),
    _t("dg", "high", "inverted", "byob"), _t("dg", "all", "rot90", "effnet"),
    _t("dg", "odd", "rot90", "mamba"), _t("dg", "all", "flip", "resnet"),
]

# Targets: name -> (task, classes); few-shot train, plus val and test splits.
SMALL_TARGETS = {
    "fm-mix5": TaskSpec("fm", "mix5", "plain"),
    "dg-high5": TaskSpec("dg", "high", "plain"),
}
BENCH_TARGETS = {
    **SMALL_TARGETS,
    "fm-upper4": TaskSpec("fm", "upper4", "plain"),
    "fm-inv-feet4": TaskSpec("fm", "feet4", "inverted"),
    "fm-rot-mix5": TaskSpec("fm", "mix5", "rot90"),
    "dg-inv-all": TaskSpec("dg", "all", "inverted"),
    "dg-rot-low5": TaskSpec("dg", "low", "rot90"),
}
FM.update({"mix5": ("T-shirt/top", "Trouser", "Coat", "Sneaker", "Bag"),
           "upper4": ("T-shirt/top", "Pullover", "Coat", "Shirt"),
           "feet4": ("Sandal", "Sneaker", "Ankle boot", "Bag")})

PRESETS = {
    "small": {"teachers": SMALL_TEACHERS, "targets": SMALL_TARGETS, "steps": 150},
    "bench": {"teachers": BENCH_TEACHERS, "targets": BENCH_TARGETS, "steps": 250},
}
SHOTS, VAL_PER_CLASS, TEST_PER_CLASS = 10, 10, 50
BATCH = 64


def _seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def _pools(dataset: str):
    """(teacher pool, target pool): disjoint images of one dataset."""
    if dataset == "fm":
        return fashion_mnist("train"), fashion_mnist("test")
    src = digits()
    idx = np.random.default_rng(12345).permutation(len(src.labels))
    cut = int(0.55 * len(idx))
    pick = lambda ix: type(src)(src.name, src.images[ix], src.labels[ix], src.class_names)  # noqa: E731
    return pick(np.sort(idx[:cut])), pick(np.sort(idx[cut:]))


def _select(source, classes, domain):
    names = list(source.class_names)
    ids = [names.index(c) for c in classes]
    mask = np.isin(source.labels, ids)
    remap = {old: new for new, old in enumerate(ids)}
    labels = np.array([remap[v] for v in source.labels[mask]], dtype=np.int64)
    return apply_domain(source.images[mask], domain), labels


def _preprocessing(spec: TeacherSpec) -> tuple[Preprocessing, dict]:
    arch, model_args, input_size = ARCHS[spec.arch]
    if input_size[0] == 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = FM_STATS if spec.task.dataset == "fm" else DIGIT_STATS
    cfg = {"input_size": list(input_size), "mean": list(mean), "std": list(std),
           "interpolation": "bilinear", "crop_pct": 1.0}
    return Preprocessing.from_pretrained_cfg(cfg), cfg


def train_teacher(spec: TeacherSpec, steps: int, seed: int, max_images: int = 6000):
    """Train one teacher from scratch (AdamW, cosine schedule, light shift augmentation).

    Returns (model, TeacherConfig) with the held-out accuracy in ``source_task``.
    """
    import timm

    arch, model_args, _ = ARCHS[spec.arch]
    pre, pcfg = _preprocessing(spec)
    pool, held = _pools(spec.task.dataset)
    images, labels = _select(pool, spec.task.classes, spec.task.domain)
    rng = np.random.default_rng(_seed(seed, spec.teacher_id))
    if len(labels) > max_images:
        keep = rng.choice(len(labels), max_images, replace=False)
        images, labels = images[keep], labels[keep]
    torch.manual_seed(_seed(seed, spec.teacher_id))
    model = timm.create_model(arch, pretrained=False, num_classes=len(spec.task.classes), **model_args)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    model.train()
    for _ in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(y_all), BATCH))
        x = pre(x_all[idx])
        shift = [int(v) for v in rng.integers(-2, 3, 2)]
        x = torch.roll(x, shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(model(x), y_all[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    h_images, h_labels = _select(held, spec.task.classes, spec.task.domain)
    h_images, h_labels = h_images[:2000], h_labels[:2000]
    with torch.inference_mode():
        pred = torch.cat([model(pre(torch.from_numpy(h_images[i:i + 500]))).argmax(1)
                          for i in range(0, len(h_labels), 500)])
    acc = float((pred.numpy() == h_labels).mean())
    cfg = TeacherConfig(
        teacher_id=spec.teacher_id, architecture=arch, num_classes=len(spec.task.classes),
        label_names=list(spec.task.classes), pretrained_cfg=pcfg,
        num_features=int(model.num_features), model_args=dict(model_args),
        source_task={"dataset": "fashion-mnist" if spec.task.dataset == "fm" else "digits",
                     "classes": list(spec.task.classes), "domain": spec.task.domain,
                     "train_images": int(len(labels)), "steps": steps, "seed": seed,
                     "heldout_accuracy": round(acc, 4)})
    return model, cfg


def save_teacher(store, model: torch.nn.Module, cfg: TeacherConfig) -> None:
    """Write config.json and model.safetensors (timm hub layout)."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    store.write_bytes(weights_key(cfg.teacher_id), save(state))
    store.write_bytes(config_key(cfg.teacher_id), cfg.to_json().encode())


def build_target(store, name: str, task: TaskSpec, seed: int) -> None:
    """A few-shot target: SHOTS train, VAL_PER_CLASS val, TEST_PER_CLASS test per class."""
    _, held = _pools(task.dataset)
    images, labels = _select(held, task.classes, task.domain)
    rng = np.random.default_rng(_seed(seed, name))
    split_idx = {"train": [], "val": [], "test": []}
    for c in range(len(task.classes)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        split_idx["train"] += list(idx[:SHOTS])
        split_idx["val"] += list(idx[SHOTS:SHOTS + VAL_PER_CLASS])
        split_idx["test"] += list(idx[SHOTS + VAL_PER_CLASS:SHOTS + VAL_PER_CLASS + TEST_PER_CLASS])
    imgs, labs = {}, {}
    for split, idx in split_idx.items():
        idx = np.array(sorted(idx))
        imgs[split] = images[idx]
        labs[split] = [task.classes[v] for v in labels[idx]]
    from .store import open_store

    write_target(open_store(store.join(f"targets/{name}")), imgs, labs)


def build_demo(out: str, preset: str = "small", seed: int = 0, log=print, s3_endpoint=None) -> dict:
    """Build (or complete) the demo zoo and its targets at ``out``; existing teachers and
    targets are kept, so an interrupted build resumes. Returns what was built."""
    from .manifest import build_manifest, write_manifest
    from .store import open_store

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (expected {', '.join(PRESETS)})")
    p = PRESETS[preset]
    store = open_store(out, s3_endpoint=s3_endpoint)
    t0 = time.time()
    built = []
    for i, spec in enumerate(p["teachers"], 1):
        if store.exists(config_key(spec.teacher_id)) and store.exists(weights_key(spec.teacher_id)):
            continue
        ts = time.time()
        model, cfg = train_teacher(spec, p["steps"], seed)
        save_teacher(store, model, cfg)
        built.append(spec.teacher_id)
        log(f"[{i}/{len(p['teachers'])}] teacher {spec.teacher_id:24s} {cfg.architecture:18s} "
            f"held-out acc {cfg.source_task['heldout_accuracy']:.3f}  ({time.time() - ts:.1f}s)")
    for name, task in p["targets"].items():
        if not store.exists(f"targets/{name}/test.parquet"):
            build_target(store, name, task, seed)
            log(f"target {name}: {len(task.classes)} classes, {SHOTS}-shot")
    write_manifest(store, build_manifest(store))
    return {"zoo": store.uri, "teachers": [s.teacher_id for s in p["teachers"]],
            "targets": [store.join(f"targets/{n}") for n in p["targets"]],
            "built": built, "seconds": time.time() - t0}
