"""Ground truths of SPEC 6 for (teacher, target) pairs, cached on disk.

- ``probe``: test accuracy of a logistic-regression probe on the teacher's pre-logit features,
  fitted on the target's train split (features standardised on the train split).
- ``distill``: test accuracy of the student distilled from the teacher with the fixed SPEC 4
  recipe (``distill.train.train_student(method="ot")``), one record per seed; the ground truth
  is the mean over the seeds found.
- ``ce``: the same recipe without a teacher (one per target and seed), reported next to
  ``distill`` to show how much the teachers help at all.

Every result is one small JSON file whose name carries a hash of its key; the key holds
everything that changes the result: teacher weights' sha256, the target files' sha256, the
probe settings or the recipe dict + hyper-parameters + student + seed, and a code version
(sha256 of the recipe's source files, or the probe's settings and scikit-learn version).
A changed key misses the cache and recomputes; nothing is ever overwritten in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

KINDS = ("distill", "probe")
PROBE_SETTINGS = {"model": "logistic-regression", "C": 1.0, "max_iter": 3000, "standardize": True,
                  "version": 1}
# source files whose code defines what a distilled student's accuracy is (SPEC 4)
RECIPE_SOURCES = ("distill/train.py", "distill/recipe.py", "distill/views.py", "distill/losses.py",
                  "ot.py")
def _log(msg: str) -> None:
    print(msg, flush=True)


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


# --------------------------------------------------------------------------- identities

@dataclass
class TeacherRef:
    """A zoo teacher: id, sha256 of its weights, and a loader (lazy; models are small)."""

    teacher_id: str
    sha256: str
    load: Callable[[], object]
    _loaded: object = None

    def get(self):
        if self._loaded is None:
            self._loaded = self.load()
        return self._loaded


@dataclass
class TargetRef:
    """A target task folder: name, uri, sha256 over its files, and the loaded TargetTask."""

    name: str
    uri: str
    sha256: str
    task: object


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _weights_sha256(store, key: str) -> str:
    from ..zoo.store import LocalStore, sha256_file

    if isinstance(store, LocalStore):
        return sha256_file(store.path(key))
    info = store.info(key)
    return info.get("sha256") or sha256_bytes(store.read_bytes(key))


def zoo_teachers(zoo_uri: str, only: list[str] | None = None, s3_endpoint: str | None = None) -> list[TeacherRef]:
    """Every teacher of a zoo (``teachers/<id>/``), sorted by id, with the sha256 of its weights."""
    from ..errors import ZooError
    from ..zoo.loading import load_teacher
    from ..zoo.manifest import list_teacher_ids
    from ..zoo.store import open_store
    from ..zoo.teacher import weights_key

    store = open_store(zoo_uri, s3_endpoint=s3_endpoint)
    ids = list_teacher_ids(store)
    if only:
        missing = sorted(set(only) - set(ids))
        if missing:
            raise ZooError(f"{store.uri}: no teacher(s) {missing}")
        ids = [t for t in ids if t in set(only)]
    if not ids:
        raise ZooError(f"{store.uri}: no teachers found (expected teachers/<id>/config.json)")
    refs = []
    for tid in ids:
        sha = _weights_sha256(store, weights_key(tid))
        refs.append(TeacherRef(tid, sha, lambda tid=tid, sha=sha: load_teacher(store, tid)))
    return refs


def zoo_target_uris(zoo_uri: str, s3_endpoint: str | None = None) -> list[str]:
    """Target folders shipped with a zoo (``targets/<name>/``), as the demo zoos have."""
    from ..zoo.store import open_store

    store = open_store(zoo_uri, s3_endpoint=s3_endpoint)
    names = sorted({k.split("/")[1] for k in store.list("targets/") if k.count("/") >= 2})
    return [store.join(f"targets/{n}") for n in names]


def load_target_ref(uri: str, s3_endpoint: str | None = None) -> TargetRef:
    """Load a target in the project's format (Parquet or ImageFolder; SPEC 0) and hash its files.
    The val split is optional (only ``distill`` needs it)."""
    from ..data.targets import load_target, target_name
    from ..errors import TargetError
    from ..zoo.store import open_store

    store = open_store(uri, s3_endpoint=s3_endpoint)
    h = hashlib.sha256()
    for key in sorted(store.list()):
        h.update(key.encode() + b"\0" + sha256_bytes(store.read_bytes(key)).encode())
    try:
        task = load_target(uri, ("train", "val", "test"), s3_endpoint=s3_endpoint)
    except TargetError as e:
        if "'val'" not in str(e):
            raise
        task = load_target(uri, ("train", "test"), s3_endpoint=s3_endpoint)
    return TargetRef(target_name(uri), uri, h.hexdigest(), task)


def normalised_source(text: str) -> str:
    """A module's code without comments, docstrings and formatting (``ast.dump``), so that
    edits to documentation or layout do not invalidate cached results."""
    import ast

    tree = ast.parse(text)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


_CODE_VERSION: list[str] = []


def recipe_code_version() -> str:
    """sha256 over the normalised source of the files that define a distilled student's
    accuracy (SPEC 4), computed once per process, when the training modules are imported (the
    code that runs, even if the files change later)."""
    if not _CODE_VERSION:
        from ..distill import train  # noqa: F401  (load the code this version describes)

        root = Path(__file__).resolve().parent.parent
        h = hashlib.sha256()
        for rel in RECIPE_SOURCES:
            h.update(rel.encode() + b"\0" + normalised_source((root / rel).read_text()).encode())
        _CODE_VERSION.append(h.hexdigest()[:16])
    return _CODE_VERSION[0]


# --------------------------------------------------------------------------- cache

class GTCache:
    """One JSON file per (kind, teacher, target, seed, key hash) under ``<root>/gt/``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root) / "gt"

    @staticmethod
    def digest(key: dict) -> str:
        return sha256_bytes(json.dumps(key, sort_keys=True).encode())[:20]

    def path(self, key: dict) -> Path:
        tid = _SAFE.sub("_", str(key.get("teacher") or "none"))
        return (self.root / key["kind"] / _SAFE.sub("_", key["target"]) / tid
                / f"seed{key.get('seed', 0)}-{self.digest(key)}.json")

    def get(self, key: dict) -> dict | None:
        p = self.path(key)
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return rec["value"] if rec.get("key") == json.loads(json.dumps(key)) else None

    def put(self, key: dict, value: dict) -> None:
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "value": value}, sort_keys=True, indent=1))
        os.replace(tmp, p)


# --------------------------------------------------------------------------- features

_FEATURES: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


@torch.inference_mode()
def teacher_outputs(teacher: TeacherRef, target: TargetRef, split: str, batch_size: int = 256):
    """(features (N, D), logits (N, K)) of the teacher on a split, float64, memoised in-process."""
    from ..assess.engine import TeacherRunner

    key = (teacher.teacher_id, teacher.sha256, target.name, target.sha256, split)
    if key not in _FEATURES:
        runner = TeacherRunner(teacher.get(), "cpu")
        images = target.task.splits[split].images
        feats, logits = [], []
        for i in range(0, len(images), batch_size):
            f, z = runner.forward(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])))
            feats.append(f.double().numpy())
            logits.append(z.double().numpy())
        _FEATURES[key] = (np.concatenate(feats), np.concatenate(logits))
    return _FEATURES[key]


# --------------------------------------------------------------------------- ground truths

def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                   settings: dict = PROBE_SETTINGS) -> float:
    """SPEC 6 ``probe``: logistic regression on features, fit on train, accuracy on test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if settings.get("standardize", True):
        scaler = StandardScaler().fit(train_x)
        train_x, test_x = scaler.transform(train_x), scaler.transform(test_x)
    clf = LogisticRegression(C=settings["C"], max_iter=settings["max_iter"])
    clf.fit(train_x, train_y)
    return float((clf.predict(test_x) == test_y).mean())


def probe_gt(teacher: TeacherRef, target: TargetRef) -> dict:
    tx, _ = teacher_outputs(teacher, target, "train")
    ex, _ = teacher_outputs(teacher, target, "test")
    s = target.task.splits
    return {"test_acc": probe_accuracy(tx, s["train"].labels, ex, s["test"].labels)}


def distill_gt(teacher: TeacherRef | None, target: TargetRef, recipe, seed: int, method: str = "ot") -> dict:
    """SPEC 6 ``distill`` (or the ``ce`` baseline with ``teacher=None``): one student, one seed."""
    from ..distill.train import train_student

    torch.manual_seed(seed)
    r = train_student(target.task, teacher.get() if teacher is not None else None, method,
                      recipe=recipe, seed=seed, device="cpu")
    return {"test_acc": r.test_acc, "val_acc": r.val_acc, "best_epoch": r.best_epoch,
            "seconds": round(r.seconds, 2)}


def probe_key(teacher: TeacherRef, target: TargetRef) -> dict:
    import sklearn

    return {"kind": "probe", "teacher": teacher.teacher_id, "teacher_sha256": teacher.sha256,
            "target": target.name, "target_sha256": target.sha256, "seed": 0,
            "probe": PROBE_SETTINGS, "sklearn": sklearn.__version__}


def distill_key(teacher: TeacherRef | None, target: TargetRef, recipe, seed: int, method: str = "ot") -> dict:
    from ..distill.recipe import DEFAULT_STUDENT, check_hp

    return {"kind": "distill" if method == "ot" else method,
            "teacher": teacher.teacher_id if teacher is not None else None,
            "teacher_sha256": teacher.sha256 if teacher is not None else None,
            "target": target.name, "target_sha256": target.sha256, "seed": int(seed),
            "recipe": recipe.to_dict(), "hp": check_hp(method, {}), "student": DEFAULT_STUDENT,
            "code": recipe_code_version()}


def _order(teachers: list[TeacherRef], target: TargetRef, limit: int | None) -> list[TeacherRef]:
    """A score-independent subset for a target: a shuffle seeded by the target's name."""
    ts = list(teachers)
    random.Random(int(sha256_bytes(target.name.encode())[:8], 16)).shuffle(ts)
    return ts[:limit] if limit else ts


def compute_probe(teachers, targets, cache: GTCache, log=_log) -> dict[str, dict[str, float]]:
    """probe ground truth {target: {teacher: accuracy}} for every pair (cheap; cached)."""
    out: dict[str, dict[str, float]] = {}
    hits = 0
    for tg in targets:
        out[tg.name] = {}
        for t in teachers:
            key = probe_key(t, tg)
            val = cache.get(key)
            if val is None:
                val = probe_gt(t, tg)
                cache.put(key, val)
            else:
                hits += 1
            out[tg.name][t.teacher_id] = val["test_acc"]
    log(f"probe ground truth: {len(teachers) * len(targets)} pairs ({hits} from the cache)")
    return out


def compute_distill(teachers, targets, cache: GTCache, recipe, seeds=(0,), teachers_per_target=None,
                    max_seconds: float | None = None, with_ce: bool = True, log=_log):
    """distill ground truth {target: {teacher: mean test accuracy over the seeds found}} and the
    ``ce`` baseline {target: mean}. Work runs target by target (a seeded, score-independent
    teacher order per target); ``max_seconds`` stops starting new students after that much
    time (0: cached results only). Pairs without any cached seed are absent."""
    t0 = time.time()
    gt: dict[str, dict[str, float]] = {}
    ce: dict[str, float] = {}
    trained = skipped = 0

    def run(t, tg, seed, method):
        nonlocal trained, skipped
        key = distill_key(t, tg, recipe, seed, method)
        val = cache.get(key)
        if val is not None:
            return val
        if "val" not in tg.task.splits:
            return None
        if max_seconds is not None and time.time() - t0 >= max_seconds:
            skipped += 1
            return None
        ts = time.time()
        val = distill_gt(t, tg, recipe, seed, method)
        cache.put(key, val)
        trained += 1
        log(f"  {method:7s} {tg.name:14s} {t.teacher_id if t else '-':26s} seed {seed}: "
            f"test {100 * val['test_acc']:.1f}  ({time.time() - ts:.0f}s)")
        return val

    for tg in targets:
        if with_ce:
            vals = [v for s in seeds if (v := run(None, tg, s, "ce")) is not None]
            if vals:
                ce[tg.name] = float(np.mean([v["test_acc"] for v in vals]))
        for t in _order(teachers, tg, teachers_per_target):
            vals = [v for s in seeds if (v := run(t, tg, s, "ot")) is not None]
            if vals:
                gt.setdefault(tg.name, {})[t.teacher_id] = float(np.mean([v["test_acc"] for v in vals]))
    log(f"distill ground truth: {sum(len(v) for v in gt.values())} pairs with a result "
        f"({trained} students trained now, {skipped} skipped for the time limit)")
    return gt, ce
