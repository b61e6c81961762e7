"""The label-space bridge of one (teacher, target) pair, recomputed for the report (SPEC 1-2).

- Cost ``M`` (K x C): ``ot.ground_cost`` on the teacher's features over the target split
  (default ``proto-cos``: ``1 - cos(w_k, mu_c)``).
- Mean transport plan: the plan from a teacher prediction ``p_i`` to the one-hot target label
  ``e_{y_i}`` is unique, ``p_i`` placed in column ``y_i`` (SPEC 1), so the mean plan is LEEP's
  soft joint ``J[k, c] = (1/N) sum_i p_ik [y_i = c]`` (SPEC 3). Its cost ``<J, M>`` equals the
  mean transport cost ``mean_i A[i, y_i]``, i.e. ``-sctd_cost`` (SPEC 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.images import DECODE_MAX_SIDE
from ..errors import TargetError

BATCH_SIZE = 256


@dataclass
class Bridge:
    """Cost matrix and mean transport plan between a teacher's and a target's label spaces."""

    teacher_id: str
    target: str
    split: str
    teacher_classes: list[str]
    target_classes: list[str]
    cost: np.ndarray   # (K, C) ground cost M
    plan: np.ndarray   # (K, C) mean transport plan J, sums to 1
    samples: int

    @property
    def transport_cost(self) -> float:
        """``<J, M>`` = mean cost of transporting ``p_i`` to ``e_{y_i}`` = ``-sctd_cost``."""
        return float((self.plan * self.cost).sum())

    def shown_rows(self, limit: int) -> np.ndarray:
        """Teacher classes to display: all if K <= limit, else the ``limit`` with the most
        plan mass (the teacher classes the target's images are actually sent to), heaviest first."""
        k = self.plan.shape[0]
        if k <= limit:
            return np.arange(k)
        return np.argsort(-self.plan.sum(axis=1), kind="stable")[:limit]

    def shown_cols(self, limit: int) -> np.ndarray:
        """Target classes to display: all if C <= limit, else the ``limit`` with the most samples."""
        c = self.plan.shape[1]
        if c <= limit:
            return np.arange(c)
        return np.sort(np.argsort(-self.plan.sum(axis=0), kind="stable")[:limit])


def mean_plan(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``J[k, c] = (1/N) sum_i probs[i, k] [labels[i] = c]`` (K, C)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    joint = np.zeros((probs.shape[1], num_classes), dtype=np.float64)
    np.add.at(joint.T, labels, probs)
    return joint / len(labels)


def compute_bridge(teacher, images: np.ndarray, labels: np.ndarray, target: str,
                   target_classes: list[str], split: str = "train",
                   device: str | torch.device | None = None,
                   batch_size: int = BATCH_SIZE) -> Bridge:
    """``bridge_from_batches`` over uint8 images (N, H, W, C) held in memory."""
    batches = ((images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, len(labels), batch_size))
    return bridge_from_batches(teacher, batches, target, target_classes, split, device)


def bridge_from_batches(teacher, batches, target: str, target_classes: list[str], split: str = "train",
                        device: str | torch.device | None = None) -> Bridge:
    """Forward the teacher over (uint8 images (n, H, W, C), class ids) batches with the scan's
    engine, keeping only streaming sums (module docstring): the class sums of the features for
    ``M`` (``ot.cost_from_prototypes``) and the soft joint for ``J``. Memory does not grow with
    the target. Teacher problems raise TeacherError naming it."""
    from .. import ot
    from ..assess.engine import TeacherRunner

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    runner = TeacherRunner(teacher, device)
    c = len(target_classes)
    sums, counts, joint, n = None, np.zeros(c), 0.0, 0
    for images, labels in batches:
        f, logits = runner.forward(torch.from_numpy(np.ascontiguousarray(images)))
        f, p = f.double().cpu(), torch.softmax(logits.double(), dim=1).cpu().numpy()
        y = np.asarray(labels, dtype=np.int64)
        if sums is None:
            sums = torch.zeros(c, f.shape[1], dtype=torch.float64)
        sums.index_add_(0, torch.from_numpy(y), f)
        counts += np.bincount(y, minlength=c)
        joint = joint + mean_plan(p, y, c) * len(y)
        n += len(y)
    if not n:
        raise TargetError(f"target {target!r}: split {split!r} is empty")
    weight = runner.weight.double().cpu().numpy()
    cost = np.asarray(ot.cost_from_prototypes(weight, sums.numpy(), counts), dtype=np.float64)
    return Bridge(teacher.teacher_id, target, split, list(teacher.config.label_names),
                  list(target_classes), cost, joint / n, n)


def load_bridge(zoo, teacher_id: str, target_name: str, target_uri: str, split: str = "train",
                s3_endpoint: str | None = None, device: str | None = None,
                teacher_cache: dict | None = None, max_side: int = DECODE_MAX_SIDE,
                class_names: list[str] | None = None) -> Bridge:
    """Load a teacher from the ``zoo`` store, then ``bridge_from_batches`` over one split of the
    target at ``target_uri``, read a batch at a time (``targets.iter_split``) and decoded as
    the scan did (``max_side``: run.json's ``settings.decode_max_side``; ``class_names``: the
    target's classes in run.json). Raises SctdError
    subclasses (TeacherError, TargetError, StoreError) on anything the user can fix."""
    from ..data.targets import iter_split
    from ..zoo.loading import load_teacher

    if teacher_cache is not None and teacher_id in teacher_cache:
        teacher = teacher_cache[teacher_id]
    else:
        teacher = load_teacher(zoo, teacher_id)
        if teacher_cache is not None:
            teacher_cache[teacher_id] = teacher
    class_names, batches = iter_split(target_uri, split, s3_endpoint=s3_endpoint, batch_size=BATCH_SIZE,
                                      class_names=class_names, max_side=max_side)
    return bridge_from_batches(teacher, batches, target_name, class_names, split=split, device=device)
