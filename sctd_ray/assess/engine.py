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
    """The teacher's classifier as one linear layer (SPEC 0: ``W_t``, ``b_t``).

    ``get_classifier()`` is usually an ``nn.Linear`` and is used as it is. Other heads that are,
    in eval mode, an affine map of the pre-logits are folded into the equivalent linear layer:
    a 1x1 ``Conv2d`` (DLA, DPN), BatchNorm + Linear (LeViT's ``NormLinear``, RepViT's head), and
    the mean of a distilled model's two heads read from the same pre-logits (LeViT,
    EfficientFormer), which is what timm predicts in eval mode. A folded head is checked once
    against the model's own logits on a probe input; a model whose logits are no affine function
    of its pre-logits (DeiT's and PiT's distillation head reads another token) is a TeacherError
    that says so."""
    tid = teacher.teacher_id
    head = teacher.model.get_classifier()
    if not isinstance(head, torch.nn.Linear):
        head = _folded_head(teacher, head)
    bad = sum(int((~torch.isfinite(p.detach())).sum()) for p in head.parameters())
    if bad:   # every score would be NaN: a broken file, said as such (not as a score's input error)
        raise TeacherError(tid, f"{bad} NaN or inf value(s) in the classifier's weights "
                                "(a corrupt model.safetensors? `sctd zoo verify` checks every tensor)")
    return head


def _head_name(head) -> str:
    if isinstance(head, (tuple, list)):
        return f"{len(head)} heads ({', '.join(type(h).__name__ for h in head)})"
    return type(head).__name__


def check_pre_logits(teacher_id: str, feats: torch.Tensor, in_features: int) -> None:
    """TeacherError unless the pre-logits are (batch, in_features), what the classifier reads
    (a model_args ``global_pool=''`` leaves an unpooled feature map)."""
    if feats.ndim != 2 or feats.shape[1] != in_features:
        raise TeacherError(teacher_id, f"pre-logits have shape {tuple(feats.shape)}, classifier expects "
                                       f"(batch, {in_features}) features (an unpooled model, e.g. "
                                       "model_args global_pool=''?)")


@torch.no_grad()
def _folded_head(teacher, head) -> torch.nn.Linear:
    """``head`` (a module, or a tuple of them whose outputs timm averages) as the equivalent
    nn.Linear, found by probing it with the pre-logits' basis and checked against the logits
    the model itself gives for one probe input (see ``linear_head``)."""
    tid, model = teacher.teacher_id, teacher.model
    name = _head_name(head)
    heads = tuple(head) if isinstance(head, (tuple, list)) else (head,)
    if not heads or not all(isinstance(h, torch.nn.Module) for h in heads):
        raise TeacherError(tid, f"classifier is {name}, not a linear layer")
    try:
        p = next(iter(model.parameters()))
        device, dtype = p.device, p.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    c, h, w = teacher.preprocessing.input_size
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    try:
        fmap = model.forward_features(x)
        feats = model.forward_head(fmap.clone(), pre_logits=True)   # a head may work in place
        logits = model.forward_head(fmap)
    except Exception as e:  # noqa: BLE001 (reported as this teacher's error)
        raise TeacherError(tid, f"forward failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    if not torch.is_tensor(feats) or not torch.is_tensor(logits) or logits.ndim != 2:
        raise TeacherError(tid, f"classifier is {name}, not a linear layer (its forward_head "
                                "does not return one logits tensor)")
    if feats.ndim != 2:
        check_pre_logits(tid, feats, feats.shape[1] if feats.ndim > 1 else 0)
    d, k = feats.shape[1], logits.shape[1]
    basis = torch.cat([torch.zeros(1, d), torch.eye(d)]).to(device, dtype)
    weights, biases = [], []
    for m in heads:
        try:
            if isinstance(m, torch.nn.Conv2d):
                if tuple(m.kernel_size) != (1, 1) or m.groups != 1:
                    raise ValueError(f"a {tuple(m.kernel_size)} convolution")
                y = m(basis[:, :, None, None]).flatten(1)
            else:
                y = m(basis)
        except Exception as e:  # noqa: BLE001
            raise TeacherError(tid, f"classifier is {name}, not a linear layer, and it does not read its "
                                    f"{d} pre-logits as one ({type(e).__name__}: {str(e)[:200]})") from None
        if y.shape != (d + 1, k):
            raise TeacherError(tid, f"classifier is {name}: it maps {d} pre-logits to {tuple(y.shape[1:])}, "
                                    f"the model predicts {k} classes")
        biases.append(y[0].double())
        weights.append((y[1:].double() - y[0].double()).T)
    weight = torch.stack(weights).mean(0)
    bias = torch.stack(biases).mean(0)
    folded = feats.double() @ weight.T + bias
    scale = float(logits.double().abs().max()) + 1e-6
    if not torch.allclose(folded, logits.double(), rtol=1e-3, atol=1e-3 * scale):
        raise TeacherError(tid, f"classifier is {name}, and the model's logits are not an affine function "
                                "of its pre-logits (e.g. a distilled ViT whose head_dist reads the "
                                "distillation token): no linear head W_t, b_t to score it with")
    lin = torch.nn.Linear(d, k).to(device)
    lin.weight.copy_(weight.float())
    lin.bias.copy_(bias.float())
    return lin.requires_grad_(False)


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
        check_pre_logits(self.teacher.teacher_id, feats, self.head.in_features)
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
