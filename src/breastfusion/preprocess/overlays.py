"""Marks drawn on ultrasound images (calipers, their dotted lines, text, logos) taken out of the
model's reach, without physician input.

BUSI and most archives carry what the sonographer drew: "+" calipers and dotted lines across a
lesion, labels such as "RT 6", scanner logos. They are not anatomy, and they are not drawn on
every class alike (a measured lesion has calipers, a normal breast rarely does), so a model can
learn them instead of the lesion. They are rendered as strokes one or two pixels wide, near
white and with sharp edges; tissue, even its brightest thin lines (skin, Cooper's ligaments), is
blurred by the beam over several pixels and lies in speckle. Hence:

1. `overlay_mask`: seeds are pixels at least `min_level` bright that stand `seed_contrast` above
   the median of their `median_size` x `median_size` neighbourhood (a stroke thinner than half
   the window vanishes from the median; a blurred tissue line does not). The mask grows from the
   seeds into connected pixels that stand `grow_contrast` above their median (the anti-aliased
   edges of a stroke), then by `dilate` pixels.
2. `inpaint`: masked pixels are filled from their unmasked surroundings by normalised Gaussian
   convolution (`sigma` pixels), repeated with a doubled sigma where a hole is wider than that.

Off by default (`preprocess.us_overlays`); a contact sheet (`breastfusion contact-sheet
--us-overlays`) shows what it changed, so a reader can check that lesions are left alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi


@dataclass(frozen=True)
class OverlayParams:
    """Parameters of the overlay mask and the inpainting (all part of the cache key when used)."""

    median_size: int = 5
    min_level: float = 0.75
    seed_contrast: float = 0.35
    grow_contrast: float = 0.15
    dilate: int = 1
    sigma: float = 3.0

    def key(self) -> dict:
        return asdict(self)


def overlay_mask(img: np.ndarray, params: OverlayParams = OverlayParams()) -> np.ndarray:
    """Boolean mask of the drawn marks of a grey image in [0, 1] (see the module docstring)."""
    img = np.asarray(img, dtype=np.float32)
    if img.ndim != 2 or min(img.shape) < params.median_size:
        return np.zeros(img.shape, dtype=bool)
    above = img - ndi.median_filter(img, size=params.median_size, mode="reflect")
    seeds = (above >= params.seed_contrast) & (img >= params.min_level)
    if not seeds.any():
        return seeds
    weak = above >= params.grow_contrast
    labels, _ = ndi.label(weak | seeds, structure=np.ones((3, 3), bool))
    mask = np.isin(labels, np.unique(labels[seeds]))
    if params.dilate > 0:
        mask = ndi.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=params.dilate)
    return mask


def inpaint(img: np.ndarray, mask: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    """`img` with the `mask` pixels replaced by a Gaussian-weighted mean of the unmasked ones near
    them (normalised convolution); pixels no unmasked neighbour reaches get a wider kernel."""
    img = np.asarray(img, dtype=np.float32)
    if not mask.any():
        return img
    keep = (~mask).astype(np.float32)
    out = img.copy()
    todo = mask.copy()
    s = float(sigma)
    for _ in range(6):  # sigma, 2 sigma, 4 sigma, ... until every hole is reached
        weight = ndi.gaussian_filter(keep, s, mode="reflect")
        filled = ndi.gaussian_filter(img * keep, s, mode="reflect") / np.maximum(weight, 1e-6)
        reached = todo & (weight > 1e-3)
        out[reached] = filled[reached]
        todo &= ~reached
        if not todo.any():
            break
        s *= 2
    out[todo] = float(np.median(img[~mask])) if (~mask).any() else 0.0
    return np.clip(out, 0.0, 1.0)


def remove_overlays(img: np.ndarray, params: OverlayParams = OverlayParams()) -> tuple[np.ndarray, float]:
    """(image with its drawn marks inpainted, share of pixels changed)."""
    mask = overlay_mask(img, params)
    return inpaint(img, mask, params.sigma), float(mask.mean())
