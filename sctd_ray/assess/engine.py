"""The teacher runner (SPEC 0-3): one forward pass of a teacher over target batches feeds the
streaming statistics of every target; runs with or without Ray, on CPU or CUDA.

The forward runs in channels_last memory order, on CUDA in bf16 autocast; statistics
accumulate on the device in float32 (float64 on CPU), so no per-batch host synchronisation
happens.
"""

from __future__ import annotations

import warnings

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from ..errors import TeacherError
from ..metrics import NAMES
from ..stats import TeacherStats

Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 images (B, H, W, C), int64 labels (B,)


@dataclass
class TargetBatches:
    """A target split as re-iterable batches of decoded images and integer labels."""

    name: str
    num_classes: int
    batches: Callable[[], Iterator[Batch]]


def batches_from_arrays(name: str, images: np.ndarray, labels: np.ndarray, num_classes: int,
                        batch_size: int = 256) -> TargetBatches:
    """In-memory target (e.g. a TargetSplit) as TargetBatches. The images are shared, not
    copied (they may be a read-only Ray object; batches are only ever read)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        x = torch.from_numpy(np.ascontiguousarray(images))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def it():
        for i in range(0, len(y), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
    return TargetBatches(name, num_classes, it)


def linear_head(teacher) -> torch.nn.Linear:
    """The teacher's classifier; SPEC 0 needs it linear (W_t, b_t)."""
    head = teacher.model.get_classifier()
    if not isinstance(head, torch.nn.Linear):
        raise TeacherError(teacher.teacher_id, f"classifier is {type(head).__name__}, not a linear layer")
    bad = sum(int((~torch.isfinite(p.detach())).sum()) for p in head.parameters())
    if bad:   # every score would be NaN: a broken file, said as such (not as a score's input error)
        raise TeacherError(teacher.teacher_id, f"{bad} NaN or inf value(s) in the classifier's weights "
                                               "(a corrupt model.safetensors? `sctd zoo verify` checks every tensor)")
    return head


class TeacherRunner:
    """Puts a loaded teacher on a device and turns uint8 target batches into (features, logits)."""

    def __init__(self, teacher, device: str | torch.device = "cpu", channels_last: bool = True):
        self.teacher = teacher
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.head = linear_head(teacher)
        # channels_last on both devices: oneDNN's CPU convolutions prefer it too
        # (bench/forward_bench.py; docs/benchmarks.md, "CPU forward memory order")
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = teacher.model.eval().to(self.device).to(memory_format=self.memory_format)

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight.detach()

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher preprocessing on the device, then pre-logits and logits (float32)."""
        feats = self.pre_logits(self.prepare(images)).float()
        return feats, self.logits(feats)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, H, W, C) -> the teacher's input on the device, in its memory order."""
        x = self.teacher.preprocessing(images.to(self.device, non_blocking=True))
        return x.contiguous(memory_format=self.memory_format)

    def pre_logits(self, x: torch.Tensor, autocast_cache: bool = True) -> torch.Tensor:
        """The teacher's body on a prepared batch (SPEC 0 features), in bf16 autocast on CUDA
        (``autocast_cache=False`` while a CUDA graph captures it)."""
        if self.cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=autocast_cache):
                return self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """The linear head on float32 pre-logits."""
        bias = None if self.head.bias is None else self.head.bias.float()
        return torch.nn.functional.linear(feats, self.head.weight.float(), bias)


def assess_teacher(teacher, targets: TargetBatches | Iterable[TargetBatches], metrics=NAMES,
                   device: str | torch.device | None = None) -> dict[str, dict[str, float]]:
    """Score one teacher on one or more targets: {target name: {metric: value}}.

    Each target's batches are forwarded once; scores are finalised from the statistics.
    Problems with the teacher raise TeacherError naming it.
    """
    if isinstance(targets, TargetBatches):
        targets = [targets]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    runner = TeacherRunner(teacher, device)
    dtype = torch.float32 if runner.cuda else torch.float64
    out = {}
    for tb in targets:
        stats = collect_stats(runner, tb, metrics, dtype)
        out[tb.name] = finalise(teacher.teacher_id, stats)
    return out


def collect_stats(runner: TeacherRunner, target: TargetBatches, metrics=NAMES,
                  dtype: torch.dtype = torch.float64) -> TeacherStats:
    stats = TeacherStats(target.num_classes, runner.weight.to(dtype), metrics=tuple(metrics),
                         device=runner.device, dtype=dtype)
    for images, labels in target.batches():
        feats, logits = runner.forward(images)
        stats.update(feats, logits, labels.to(runner.device, non_blocking=True))
    return stats


def finalise(teacher_id: str, stats: TeacherStats) -> dict[str, float]:
    """compute() with input errors re-raised as TeacherError naming the teacher."""
    try:
        return stats.compute()
    except (ValueError, FloatingPointError, RuntimeError) as e:
        raise TeacherError(teacher_id, f"cannot score: {e}") from None
