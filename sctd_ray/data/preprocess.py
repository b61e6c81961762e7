"""A teacher's preprocessing, applied on the device to decoded uint8 batches (SPEC 0).

Target images travel as uint8 (B, H, W, C); each teacher resizes them to its own input size,
adapts the channel count, and normalises with its own mean and std, on the device that runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F


# on the host, uint8 images are made float and resized this many bytes of float at a time (a
# batch of 256 decoded 512 px photos would otherwise be 0.8 GB of float before its resize)
HOST_RESIZE_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Preprocessing:
    """What a teacher expects: ``input_size = (C, H, W)``, per-channel mean and std."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    @classmethod
    def from_pretrained_cfg(cls, cfg: dict) -> "Preprocessing":
        c, h, w = (int(v) for v in cfg["input_size"])
        mean = tuple(float(v) for v in cfg.get("mean", (0.5,) * c))
        std = tuple(float(v) for v in cfg.get("std", (0.5,) * c))
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {c} channels")
        interp = cfg.get("interpolation", "bilinear")
        return cls((c, h, w), mean, std, interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear")

    @property
    def geometry(self) -> tuple:
        """What ``resize`` depends on: teachers with equal geometries see the same resized images."""
        return (self.input_size, self.interpolation)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, C) or float (B, C, H, W) in [0, 1] -> normalised float (B, C', H', W')."""
        return self.normalise(self.resize(images))

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """The geometric part: uint8 (B, H, W, C) or float (B, C, H, W) in [0, 1] -> float
        (B, C', H', W') in [0, 1] at the input size and channel count (a no-op on float images
        that already have them). Each image is mapped on its own, so resizing a whole target
        once equals resizing it batch by batch."""
        x = images
        c, h, w = self.input_size
        if x.dtype == torch.uint8 and x.device.type == "cpu" and len(x) > 1 and tuple(x.shape[1:3]) != (h, w):
            step = max(1, HOST_RESIZE_CHUNK_BYTES // (x[0].numel() * 4))
            if len(x) > step:  # large images on the host: a few at a time, not all as float at once
                return torch.cat([self.resize(x[i:i + step]) for i in range(0, len(x), step)])
        if x.dtype == torch.uint8:
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[1] != c:
            if x.shape[1] == 1:
                x = x.expand(-1, c, -1, -1)
            elif c == 1:  # RGB -> luminance (ITU-R 601), as PIL's convert("L")
                x = (x[:, 0:1] * 0.299 + x[:, 1:2] * 0.587 + x[:, 2:3] * 0.114)
            else:
                raise ValueError(f"cannot map {x.shape[1]} image channels to {c}")
        if tuple(x.shape[-2:]) != (h, w):
            kw = {"antialias": True, "align_corners": False} if self.interpolation != "nearest" else {}
            x = F.interpolate(x, size=(h, w), mode=self.interpolation, **kw)
        return x

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Float (B, C, H, W) in [0, 1] -> (x - mean) / std, per channel."""
        mean, std = normalisation(self.mean, self.std, x.device, x.dtype)
        return (x - mean) / std


@lru_cache(maxsize=256)
def normalisation(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std as (1, C, 1, 1) tensors on ``device``, built once per device and
    dtype: a tensor made from Python numbers on a GPU is a copy that waits for every queued
    kernel, which per batch would keep the host from queueing the next forward pass."""
    t = torch.tensor([mean, std], dtype=dtype)
    t = t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)
    return t[0].view(1, -1, 1, 1), t[1].view(1, -1, 1, 1)
