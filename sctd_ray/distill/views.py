"""Function-matching views (SPEC 4; Beyer et al., CVPR 2022).

With 5-20 labelled images per class, a teacher only helps when it is asked about many more
inputs than the labelled ones. Every step draws a batch of target training images and turns
it into augmented float views in [0, 1] (random resized crop, translation, small rotation, a
smooth random warp, horizontal flip only where the domain allows it) and mixes part of the
batch pairwise (mixup between target images). Teacher and student see the *same* views; each
applies its own normalisation. Mixed views carry no label: only the distillation term uses them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .recipe import Recipe


@dataclass
class Views:
    """One step's inputs: ``x`` (B, C, H, W) float views in [0, 1] shown to teacher and student
    alike; ``labels`` (B,) of the first image of each view; ``mixed`` (B,) bool, true for the
    first ``n_mixed`` views (a host count, so no step reads ``mixed`` back from a GPU); for mixed
    views ``partner`` labels and ``weight`` (the share of the first image)."""

    x: torch.Tensor
    labels: torch.Tensor
    mixed: torch.Tensor
    partner: torch.Tensor
    weight: torch.Tensor
    n_mixed: int = 0

    @property
    def labelled(self) -> slice:
        """The labelled (unmixed) views: ``v.x[v.labelled]``."""
        return slice(self.n_mixed, None)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory, asynchronously, so the
    copy never waits for the kernels already queued (a plain ``.to`` synchronises)."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


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
    theta = to_device(theta, x.device).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if recipe.warp > 0:  # a smooth displacement field from a 4x4 grid of random offsets
        d = (torch.rand(b, 2, 4, 4, generator=gen) * 2 - 1) * (2 * recipe.warp)
        d = F.interpolate(to_device(d, x.device).to(x.dtype), size=tuple(x.shape[-2:]),
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
    labels = to_device(labels, x.device)
    n_mix = int(round(recipe.mix_frac * b)) if mix else 0
    mixed = torch.zeros(b, dtype=torch.bool, device=x.device)
    partner = labels.clone()
    weight = torch.ones(b, device=x.device)
    if n_mix:
        other = (torch.arange(n_mix) + torch.randint(1, b, (n_mix,), generator=gen)) % b
        lam = to_device(torch.rand(n_mix, generator=gen), x.device)
        other = to_device(other, x.device)
        x = x.clone()
        x[:n_mix] = lam.view(-1, 1, 1, 1) * x[:n_mix] + (1 - lam.view(-1, 1, 1, 1)) * x[other]
        mixed[:n_mix] = True
        partner[:n_mix] = labels[other]
        weight[:n_mix] = lam
    return Views(x, labels, mixed, partner, weight, n_mix)


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
