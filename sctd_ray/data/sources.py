"""Real image sources available offline: Fashion-MNIST (Debian ``dataset-fashion-mnist``) and
scikit-learn's bundled digits. Each returns uint8 images (N, H, W, 1), int labels, class names.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import SctdError

FASHION_MNIST_DIR = Path(os.environ.get("SCTD_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class ImageSource:
    """Images (N, H, W, C) uint8, labels (N,) int64 into ``class_names``."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@lru_cache(maxsize=2)
def fashion_mnist(split: str = "train") -> ImageSource:
    """Fashion-MNIST ``train`` (60k) or ``test`` (10k), 28x28 grey."""
    prefix = {"train": "train", "test": "t10k"}[split]
    img_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    lab_path = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.exists() or not lab_path.exists():
        raise SctdError(f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: install it with "
                        "`apt-get install dataset-fashion-mnist` (or set SCTD_FASHION_MNIST_DIR)")
    images = _read_idx(img_path)[:, :, :, None]
    labels = _read_idx(lab_path).astype(np.int64)
    return ImageSource(f"fashion-mnist-{split}", images, labels, FASHION_CLASSES)


@lru_cache(maxsize=1)
def digits() -> ImageSource:
    """scikit-learn's 1,797 8x8 digits, rescaled from 0..16 to 0..255 and upsampled to 16x16."""
    from sklearn.datasets import load_digits

    d = load_digits()
    img = (d.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
    img = img.repeat(2, axis=1).repeat(2, axis=2)  # nearest 2x: keeps the data, sizes like a real small image
    return ImageSource("digits", img[:, :, :, None], d.target.astype(np.int64), DIGIT_CLASSES)


def apply_domain(images: np.ndarray, domain: str) -> np.ndarray:
    """Another domain of the same images: ``plain``, ``inverted``, ``rot90``, ``flip``."""
    if domain == "plain":
        return images
    if domain == "inverted":
        return 255 - images
    if domain == "rot90":
        return np.ascontiguousarray(np.rot90(images, k=1, axes=(1, 2)))
    if domain == "flip":
        return np.ascontiguousarray(images[:, ::-1])
    raise ValueError(f"unknown domain {domain!r} (expected plain, inverted, rot90, flip)")
