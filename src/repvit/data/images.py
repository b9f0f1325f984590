"""Decoding images to the 8-bit mode a model reads, for every Pillow mode a dataset may hold.

``Image.convert("RGB")`` is right for the 8-bit modes (L, P, RGBA, CMYK, YCbCr, 1, ...), but it clips the wide
ones instead of scaling them: a 16-bit grayscale PNG (mode ``I;16`` or ``I``) comes out almost all white, a float
image (``F``) with values in 0..1 almost all black - silently, since nothing fails. Those are rescaled to 0..255
first: 16-bit and 32-bit integer images are taken as 16-bit data (0..65535, the range PNG and TIFF store), float
images as 0..1 when their largest value is at most 1, else as 0..255 (clipped).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["to_mode"]


def _to_8bit(im: Image.Image) -> Image.Image:
    a = np.asarray(im)
    if im.mode == "F":
        a = a.astype(np.float32)
        finite = a[np.isfinite(a)]
        scale = 255.0 if finite.size and float(finite.max()) <= 1.0 else 1.0
        a = np.nan_to_num(a * scale, nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    # I;16 (any byte order) and I: 16-bit data; the top byte is the 8-bit value
    a = np.clip(a.astype(np.int64), 0, 65535) >> 8
    return Image.fromarray(a.astype(np.uint8), "L")


def to_mode(im: Image.Image, mode: str = "RGB") -> Image.Image:
    """``im`` as an 8-bit ``mode`` image ("RGB" or "L"), wide modes rescaled rather than clipped."""
    if im.mode == "F" or im.mode == "I" or im.mode.startswith("I;16"):
        im = _to_8bit(im)
    return im.convert(mode)     # always a loaded copy, even in the same mode: callers close the file afterwards
