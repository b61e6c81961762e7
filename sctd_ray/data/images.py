"""PNG encode/decode for target images (uint8 arrays of shape (H, W, C), C in {1, 3})."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import TargetError


def encode_png(image: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) / (H, W, 1) / (H, W, 3) array as PNG bytes."""
    arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def decode_image(data: bytes, size: tuple[int, int] | None = None, where: str = "",
                 channels: int | None = None) -> np.ndarray:
    """Decode PNG/JPEG bytes to uint8 (H, W, C), grey kept as C=1, anything else as RGB
    (or forced to ``channels`` 1 or 3, so one target's images share a channel count).

    With ``size=(H, W)`` the image is resized (bilinear) when it differs, so one target's
    images stack into one array. Undecodable bytes raise TargetError naming ``where``.
    """
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, TypeError) as e:
        raise TargetError(f"undecodable image {where}: {e}") from None
    grey = img.mode in ("L", "1", "I;16", "I", "F", "LA")
    if channels is not None:
        grey = channels == 1
    img = img.convert("L") if grey else img.convert("RGB")
    if size is not None and (img.height, img.width) != tuple(size):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr
