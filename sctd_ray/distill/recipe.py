"""The training recipe of SPEC 4 ("function matching", Beyer et al., CVPR 2022).

With 5-20 labelled images per class, a teacher only helps when it is asked about many more
inputs than the labelled ones. Every step draws a batch of target training images and turns
it into strongly augmented float views in [0, 1] (random resized crop, translation, small
rotation, horizontal flip only where the domain allows it) and mixes part of the batch
pairwise (mixup between target images). Teacher and student see the *same* views; each applies
its own normalisation. Mixed views carry no label: only the distillation term uses them.

``Recipe`` holds everything that is fixed for a search (steps, batch, augmentation); the
hyper-parameters a search varies (lam, tau, eps, lr) live in a plain dict (``DEFAULT_HP``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from ..errors import SctdError

METHODS = ("ot", "kd", "ce")
DEFAULT_HP = {"lam": 1.0, "tau": 2.0, "eps": 0.05, "lr": 3e-3}


@dataclass(frozen=True)
class Recipe:
    """Fixed training settings (SPEC 4). An epoch is ``steps_per_epoch`` steps; validation
    accuracy is measured after every epoch, so it is also the report interval of a trial."""

    epochs: int = 12
    steps_per_epoch: int = 50
    batch_size: int = 64
    warmup_steps: int = 30
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    # augmentation, per view (shapes relative to the image side)
    crop_scale: tuple[float, float] = (0.35, 1.0)   # area fraction of the random resized crop
    crop_ratio: tuple[float, float] = (0.75, 1.3333)
    translate: float = 0.1                          # extra shift, fraction of the side
    rotate: float = 10.0                            # degrees, uniform in [-rotate, rotate]
    warp: float = 0.0                               # smooth random displacement, fraction of the side
    hflip: bool = False                             # only where the domain allows it
    mix_frac: float = 0.5                           # share of each batch that is mixed pairwise
    # what the ce baseline does with mixed views: "labels" (mixup targets) or "none" (no mixing)
    ce_mix: str = "labels"

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Recipe":
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SctdError(f"unknown recipe setting(s) {unknown}; known: {', '.join(sorted(names))}")
        for k in ("crop_scale", "crop_ratio"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        r = cls(**d)
        r.validate()
        return r

    def validate(self) -> None:
        if self.epochs < 1 or self.steps_per_epoch < 1 or self.batch_size < 2:
            raise SctdError(f"recipe needs epochs >= 1, steps_per_epoch >= 1, batch_size >= 2; got "
                            f"{self.epochs}, {self.steps_per_epoch}, {self.batch_size}")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise SctdError(f"crop_scale must satisfy 0 < low <= high <= 1; got {self.crop_scale}")
        if not 0 <= self.mix_frac < 1:
            raise SctdError(f"mix_frac must lie in [0, 1); got {self.mix_frac}")
        if self.ce_mix not in ("labels", "none"):
            raise SctdError(f"ce_mix must be 'labels' or 'none'; got {self.ce_mix!r}")


def check_hp(method: str, hp: dict) -> dict:
    """Complete ``hp`` with ``DEFAULT_HP`` and check the values a user can get wrong."""
    if method not in METHODS:
        raise SctdError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    unknown = sorted(set(hp) - set(DEFAULT_HP))
    if unknown:
        raise SctdError(f"unknown hyper-parameter(s) {unknown}; known: {', '.join(DEFAULT_HP)}")
    out = {**DEFAULT_HP, **{k: float(v) for k, v in hp.items()}}
    for k, v in out.items():
        if not (math.isfinite(v) and (v > 0 or (k == "lam" and v == 0))):
            raise SctdError(f"hyper-parameter {k} must be a positive number; got {v}")
    return out


@dataclass
class Views:
    """One step's inputs: ``x`` (B, C, H, W) float views in [0, 1] shown to teacher and student
    alike; ``labels`` (B,) of the first image of each view; ``mixed`` (B,) bool; for mixed views
    ``partner`` labels and ``weight`` (the share of the first image)."""

    x: torch.Tensor
    labels: torch.Tensor
    mixed: torch.Tensor
    partner: torch.Tensor
    weight: torch.Tensor

    @property
    def labelled(self) -> torch.Tensor:
        return ~self.mixed


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(n, generator=gen) * (hi - lo) + lo


def augment(x: torch.Tensor, recipe: Recipe, gen: torch.Generator) -> torch.Tensor:
    """Random resized crop + translation + rotation (+ flip) of every image, one affine
    resampling per batch (``affine_grid``/``grid_sample``); x is float (B, C, H, W) in [0, 1]."""
    b = x.shape[0]
    lo, hi = recipe.crop_scale
    area = _uniform(gen, b, lo, hi)
    log_r = _uniform(gen, b, math.log(recipe.crop_ratio[0]), math.log(recipe.crop_ratio[1]))
    ratio = torch.exp(log_r)
    w = torch.sqrt(area * ratio).clamp(max=1.0)            # crop side, fraction of the width
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - w)  # crop centre inside the image
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - h)
    cx = cx + (torch.rand(b, generator=gen) * 2 - 1) * 2 * recipe.translate
    cy = cy + (torch.rand(b, generator=gen) * 2 - 1) * 2 * recipe.translate
    angle = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(recipe.rotate)
    flip = torch.ones(b)
    if recipe.hflip:
        flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([w * cos * flip, -h * sin, cx], 1),
                         torch.stack([w * sin * flip, h * cos, cy], 1)], 1)
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if recipe.warp > 0:  # a smooth displacement field from a 4x4 grid of random offsets
        d = (torch.rand(b, 2, 4, 4, generator=gen) * 2 - 1) * (2 * recipe.warp)
        d = F.interpolate(d.to(device=x.device, dtype=x.dtype), size=tuple(x.shape[-2:]),
                          mode="bicubic", align_corners=True)
        grid = grid + d.permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                         align_corners=False).clamp_(0.0, 1.0)


def make_views(images: torch.Tensor, labels: torch.Tensor, recipe: Recipe, gen: torch.Generator,
               mix: bool = True) -> Views:
    """Augment a batch (uint8 (B, H, W, C) or float (B, C, H, W)) and mix the first
    ``mix_frac`` of it with a random other view of the batch (weight ~ U(0, 1))."""
    x = to_float(images) if images.dtype == torch.uint8 else images.float()
    x = augment(x, recipe, gen)
    b = x.shape[0]
    labels = labels.to(x.device)
    n_mix = int(round(recipe.mix_frac * b)) if mix else 0
    mixed = torch.zeros(b, dtype=torch.bool, device=x.device)
    partner = labels.clone()
    weight = torch.ones(b, device=x.device)
    if n_mix:
        other = (torch.arange(n_mix) + torch.randint(1, b, (n_mix,), generator=gen)) % b
        lam = torch.rand(n_mix, generator=gen).to(x.device)
        other = other.to(x.device)
        x = x.clone()
        x[:n_mix] = lam.view(-1, 1, 1, 1) * x[:n_mix] + (1 - lam.view(-1, 1, 1, 1)) * x[other]
        mixed[:n_mix] = True
        partner[:n_mix] = labels[other]
        weight[:n_mix] = lam
    return Views(x, labels, mixed, partner, weight)


class BatchSampler:
    """Indices of the training images, a fresh permutation each pass (every image is drawn
    equally often), from a seeded generator."""

    def __init__(self, n: int, batch_size: int, gen: torch.Generator):
        self.n, self.batch_size, self.gen = n, batch_size, gen
        self.queue = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        while len(self.queue) < self.batch_size:
            self.queue = torch.cat([self.queue, torch.randperm(self.n, generator=self.gen)])
        idx, self.queue = self.queue[:self.batch_size], self.queue[self.batch_size:]
        return idx

    def state(self) -> torch.Tensor:
        return self.queue.clone()

    def load(self, queue: torch.Tensor) -> None:
        self.queue = queue.clone().long()


def lr_at(step: int, recipe: Recipe, lr: float) -> float:
    """Linear warm-up, then cosine decay to 0 at ``total_steps``."""
    if step < recipe.warmup_steps:
        return lr * (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / max(1, recipe.total_steps - recipe.warmup_steps)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
