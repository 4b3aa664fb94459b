"""Reading an image file and bringing it to the model's square input size.

Aspect ratio is kept by padding with the background value (0) before
resizing (method.md, MG preprocessing: "keep aspect ratio by padding").
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..ingest.pixels import read_pixels


def read_grey(path: str) -> np.ndarray:
    """Read a DICOM or image file as a 2D float32 array scaled to [0, 1] (see ingest.pixels)."""
    return read_pixels(path)


def pad_to_square(arr: np.ndarray) -> np.ndarray:
    h, w = arr.shape
    side = max(h, w)
    out = np.zeros((side, side), dtype=arr.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = arr
    return out


def resize(arr: np.ndarray, size: int) -> np.ndarray:
    if arr.shape == (size, size):
        return arr.astype(np.float32, copy=False)
    img = Image.fromarray(arr.astype(np.float32), mode="F")
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
