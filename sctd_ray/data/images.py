"""PNG encode/decode for target images (uint8 arrays of shape (H, W, C), C in {1, 3}), and the
size a target's images are decoded to (SPEC 0: the target side of a teacher's preprocessing)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import TargetError

# A target's images are decoded no larger than this (or than its largest teacher's input, when
# that is larger): a folder of 12-megapixel phone photos would otherwise hold 36 MB per image.
DECODE_MAX_SIDE = 512
EXIF_ORIENTATION = 0x0112
GREY_MODES = ("L", "1", "LA", "I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def encode_png(image: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) / (H, W, 1) / (H, W, 3) array as PNG bytes."""
    arr = np.asarray(image, dtype=np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def decode_size(first: tuple[int, int], max_side: int = DECODE_MAX_SIDE) -> tuple[int, int]:
    """The (H, W) every image of a target split is decoded to, from its first image's (H, W):
    that size when it is square and at most ``max_side``, else the square of side
    min(its shorter side, ``max_side``). Teachers take square inputs; a square decode lets each
    resize without distorting, as timm's eval transform (shorter side, then centre crop)."""
    h, w = (int(v) for v in first)
    if h == w and h <= max_side:
        return h, w
    side = max(1, min(h, w, int(max_side)))
    return side, side


def decode_image(data: bytes, size: tuple[int, int] | None = None, where: str = "",
                 channels: int | None = None) -> np.ndarray:
    """Decode PNG/JPEG bytes to uint8 (H, W, C), upright (EXIF orientation applied); grey kept
    as C=1 (16-bit grey scaled to 8 bits), anything else RGB, or forced to ``channels`` 1 or 3.

    With ``size=(H, W)`` an image of another size is scaled to cover it, keeping its aspect
    ratio, and centre-cropped (bilinear, antialiased; a large JPEG is first decoded at a
    reduced scale), so one target's images stack into one array. Undecodable bytes raise
    TargetError naming ``where``.
    """
    return decode_with_side(data, size, where, channels)[0]


def decode_with_side(data: bytes, size: tuple[int, int] | None = None, where: str = "",
                     channels: int | None = None) -> tuple[np.ndarray, int]:
    """``decode_image``, and the shorter side of the image as stored (read from the same open)."""
    try:
        img = Image.open(io.BytesIO(data))
        side = min(img.size)
        if size is not None and img.format == "JPEG" and min(img.size) >= 2 * min(size):
            img.draft(None, (size[1], size[0]))   # libjpeg's DCT scaling: 2-8x less to decode
        img.load()
        if img.getexif().get(EXIF_ORIENTATION, 1) != 1:   # a phone photo taken sideways
            img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as e:   # not an OSError: would escape as a traceback
        raise TargetError(f"undecodable image {where}: {e} (Pillow's limit on pixels per "
                          "image; downscale it)") from None
    except UnidentifiedImageError:
        raise TargetError(f"undecodable image {where}: not an image format Pillow reads "
                          f"({len(data) if isinstance(data, (bytes, bytearray)) else 'no'} bytes)") from None
    except (OSError, ValueError, TypeError, SyntaxError) as e:
        raise TargetError(f"undecodable image {where}: {e}") from None
    if img.mode.startswith("I"):  # 16-bit (or 32-bit integer) grey: full range to 0..255
        a = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    grey = img.mode in GREY_MODES if channels is None else channels == 1
    img = img.convert("L") if grey else img.convert("RGB")
    if size is not None and (img.height, img.width) != tuple(size):
        img = ImageOps.fit(img, (size[1], size[0]), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return (arr[:, :, None] if arr.ndim == 2 else arr), side


def unify_channels(images: list[np.ndarray]) -> list[np.ndarray]:
    """Grey images as RGB (each value in all three channels, as PIL's convert("RGB")) when any
    image is in colour, so a target's images share one channel count whatever their order."""
    if all(im.shape[2] == images[0].shape[2] for im in images):
        return images
    return [np.repeat(im, 3, axis=2) if im.shape[2] == 1 else im for im in images]
