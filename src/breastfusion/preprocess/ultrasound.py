"""Ultrasound preprocessing without physician input: find the scan area, handle colour.

Scan area (`crop_scan_area`), vendor-agnostic: ultrasound tissue is speckle,
a large region that is neither black nor flat, while scanner UI is black
background, flat panels, thin text, rulers, calipers and logos.

1. A working copy, box-downsampled so its longer side is at most `work_size`.
2. Local median and standard deviation over a square window (`window`, a
   fraction of the shorter side). Tissue = local median above `dark_level`
   AND local std above `min_std` (speckle). Black borders fail the first
   test (and a median ignores thin bright strokes: text, ruler lines), flat
   grey panels the second.
3. A square closing (`close_size`) joins the tissue across dark speckle and
   hypoechoic regions (holes filled); then an opening with a square of side
   `open_size` (fraction of the shorter side) removes what is thinner than
   that: text, rulers, tick marks, thin lines (a square keeps the corners
   of rectangular scan areas).
4. The largest 8-connected component, with any other component of at least
   `keep_fraction` of its area (a cyst or shadow spanning the whole width
   splits the tissue into two bands), is the scan area; its convex hull
   (scan areas are rectangles, sectors or trapezoids, all convex) fills the
   anechoic cysts and dark shadows inside it.
5. The crop is the hull's bounding box, then rows and columns at its edges
   whose share of non-black pixels (value above `black_level`) is below
   `trim_fill` are trimmed (the window blurs the edge by a few pixels;
   featureless black depth below the tissue goes too). With `mask_outside`,
   pixels outside the hull are set to 0 (logos and text in the black corners
   beside a sector).

Fallback: the whole image with ``CropInfo.fallback=True`` and a reason, when
the image has no contrast or the largest component covers less than
`min_area` of the image. BUSI images are mostly captured already cropped to
the scan area: there the crop keeps nearly everything, which is right.
Annotations drawn inside the scan area (calipers, text such as "RT 6") stay:
cropping cannot remove them without removing tissue.

Colour (`colour_fraction`, `apply_colour_policy`): a pixel is clearly
coloured when its chroma (max - min of R, G, B, in [0, 1]) is at least
`colour_min_chroma` and its HSV saturation (chroma / max) at least
`colour_min_saturation`; grey screen captures, JPEG noise and the faint
tinted boxes some scanners draw stay below both. An image is *coloured*
when more than `colour_max_fraction` of its pixels are. On BUSI this
separates the five colour-Doppler images (0.38-0.69% coloured pixels) from
the six other RGB files, grey or with a faint overlay or a few tinted UI
pixels (at most 0.002%). The policy:
``"reject"`` raises InputImageError naming the file and the fraction (the
paper excluded Doppler images); ``"grey"`` converts to luminance (ITU-R
BT.601) and flags the image ``colour_greyed``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

from ..choices import ColourPolicy
from ..errors import InputImageError
from .mammo import CropInfo, bbox_of, downsample, upsample_mask

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class UltrasoundCrop:
    """Parameters of the ultrasound scan-area crop and colour check (all part of the cache key).

    work_size: longer side (pixels) of the downsampled copy the mask is computed on.
    window: side of the local median / std window, as a fraction of the shorter side (>= 5 px).
    dark_level: local median at or below this is black (border, UI background).
    min_std: local standard deviation at or below this is flat (UI panel, not speckle).
    close_size: side of the square closing (fraction of the shorter side) that joins the
        tissue mask across dark speckle and shadows before the opening.
    open_size: side of the square opening, as a fraction of the shorter side; thinner
        structures (text, rulers, ticks, lines) are removed.
    keep_fraction: components of at least this share of the largest one's area are kept with it
        (a cyst or shadow across the whole width splits the tissue in two).
    min_area: smallest plausible scan area, as a fraction of the image; smaller: fallback.
    black_level: a pixel at or below this value is black (for the edge trim).
    trim_fill: edge rows / columns of the box with a smaller share of non-black pixels are trimmed.
    mask_outside: set pixels outside the scan area's convex hull to 0.
    colour_min_chroma: a coloured pixel has max - min of its R, G, B at least this.
    colour_min_saturation: ... and an HSV saturation (chroma / max) at least this.
    colour_max_fraction: an image with a larger share of coloured pixels is coloured.
    """

    work_size: int = 256
    window: float = 0.03
    dark_level: float = 0.02
    min_std: float = 0.008
    close_size: float = 0.02
    open_size: float = 0.04
    keep_fraction: float = 0.2
    min_area: float = 0.10
    black_level: float = 0.02
    trim_fill: float = 0.10
    mask_outside: bool = True
    colour_min_chroma: float = 0.25
    colour_min_saturation: float = 0.4
    colour_max_fraction: float = 0.001

    def key(self) -> dict:
        return asdict(self)


# -- colour ---------------------------------------------------------------------------------------


def colour_fraction(rgb: np.ndarray, params: UltrasoundCrop = UltrasoundCrop()) -> float:
    """Share of clearly coloured pixels in an (H, W, 3) image in [0, 1] (see the module docstring)."""
    rgb = np.asarray(rgb, dtype=np.float32)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"colour_fraction takes an (H, W, 3) image, not shape {rgb.shape}")
    if rgb.size == 0:
        return 0.0
    top = rgb.max(axis=-1)
    chroma = top - rgb.min(axis=-1)
    saturation = chroma / np.maximum(top, 1e-6)
    coloured = (chroma >= params.colour_min_chroma) & (saturation >= params.colour_min_saturation)
    return float(coloured.mean())


def luminance(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) in [0, 1] -> (H, W) float32 by ITU-R BT.601 luma."""
    return np.clip(np.asarray(rgb, dtype=np.float32) @ LUMA, 0.0, 1.0)


def apply_colour_policy(rgb: np.ndarray, policy: ColourPolicy, path: str | os.PathLike = "",
                        params: UltrasoundCrop = UltrasoundCrop()) -> tuple[np.ndarray, float, bool]:
    """Grey image, colour fraction and whether the colour policy acted, for a colour file.

    A coloured image (fraction above `colour_max_fraction`) is refused with
    InputImageError (policy ``"reject"``) or converted to luminance and
    reported as acted on (``"grey"``). An image below the threshold is
    converted to luminance without a flag.
    """
    policy = ColourPolicy.parse(policy, "colour policy")
    fraction = colour_fraction(rgb, params)
    coloured = fraction > params.colour_max_fraction
    if coloured and policy == ColourPolicy.REJECT:
        raise InputImageError(
            f"{path}: colour image ({fraction:.2%} coloured pixels, over "
            f"{params.colour_max_fraction:.2%}: Doppler or colour overlay); colour policy is reject"
        )
    return luminance(rgb), fraction, coloured


# -- scan area ------------------------------------------------------------------------------------


def local_stats(img: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Local mean and standard deviation over a size x size window."""
    img = img.astype(np.float64, copy=False)
    mean = ndi.uniform_filter(img, size=size, mode="reflect")
    sq = ndi.uniform_filter(img * img, size=size, mode="reflect")
    return mean, np.sqrt(np.maximum(sq - mean * mean, 0.0))


def convex_fill(mask: np.ndarray) -> np.ndarray:
    """The filled convex hull of a boolean mask (the mask itself when its hull is degenerate)."""
    edge = mask & ~ndi.binary_erosion(mask)  # the hull of the boundary is the hull of the mask
    points = np.argwhere(edge)
    if len(points) < 3:
        return mask
    top, left, bottom, right = bbox_of(mask)
    try:
        hull = ConvexHull(points.astype(np.float64))
    except QhullError:
        return ndi.binary_fill_holes(mask)
    rows, cols = np.mgrid[top:bottom, left:right]
    grid = np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.float64)
    # pixel centres within half a pixel of the hull count as inside
    inside = np.all(grid @ hull.equations[:, :2].T + hull.equations[:, 2] <= 0.5, axis=1)
    out = np.zeros_like(mask, dtype=bool)
    out[top:bottom, left:right] = inside.reshape(rows.shape)
    return out | mask


def scan_mask(img: np.ndarray, params: UltrasoundCrop = UltrasoundCrop()) -> tuple[np.ndarray | None, str]:
    """Scan-area mask (convex) at the working resolution, or (None, reason)."""
    work = downsample(np.asarray(img, dtype=np.float32), params.work_size)
    if work.size == 0 or float(np.ptp(work)) < params.dark_level:
        return None, "no contrast (blank image)"
    short = min(work.shape)
    win = max(5, int(round(params.window * short)))
    median = ndi.median_filter(work, size=win, mode="reflect")
    _, std = local_stats(work, win)
    tissue = (median > params.dark_level) & (std > params.min_std)
    close = max(1, int(round(params.close_size * short)))
    if close > 1:  # padded with edge values, so the image border does not erode the mask
        padded = np.pad(tissue, close, mode="edge")
        padded = ndi.binary_closing(padded, structure=np.ones((close, close), bool))
        tissue = ndi.binary_fill_holes(padded[close:-close, close:-close])
    side = max(3, int(round(params.open_size * short)))
    tissue = ndi.binary_opening(tissue, structure=np.ones((side, side), bool))
    comp = large_components(tissue, params.keep_fraction)
    if not comp.any():
        return None, "no speckled region found"
    return convex_fill(comp), ""


def large_components(mask: np.ndarray, keep_fraction: float) -> np.ndarray:
    """The 8-connected components of at least `keep_fraction` times the largest one's area."""
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = sizes >= keep_fraction * sizes.max()
    keep[0] = False
    return keep[labels]


def _trim(img: np.ndarray, box: tuple[int, int, int, int], params: UltrasoundCrop) -> tuple[int, int, int, int]:
    """Shrink `box` while its edge row / column is mostly black."""
    top, left, bottom, right = box
    lit = img > params.black_level
    while bottom - top > 1 and lit[top, left:right].mean() < params.trim_fill:
        top += 1
    while bottom - top > 1 and lit[bottom - 1, left:right].mean() < params.trim_fill:
        bottom -= 1
    while right - left > 1 and lit[top:bottom, left].mean() < params.trim_fill:
        left += 1
    while right - left > 1 and lit[top:bottom, right - 1].mean() < params.trim_fill:
        right -= 1
    return top, left, bottom, right


def crop_scan_area(img_grey: np.ndarray, rgb: np.ndarray | None = None,
                   params: UltrasoundCrop = UltrasoundCrop()) -> tuple[np.ndarray, CropInfo]:
    """Crop a grey ultrasound image (2D, [0, 1]) to its scan area; see the module docstring.

    `rgb`, the colour image when the file has colour, only adds its
    `colour_fraction` to the info (and the flag ``colour`` when it is over
    `colour_max_fraction`); the colour policy is `apply_colour_policy`'s job.
    """
    img = np.asarray(img_grey, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"crop_scan_area takes a 2D grey image, not shape {img.shape}")
    shape = (int(img.shape[0]), int(img.shape[1]))
    colour = colour_fraction(rgb, params) if rgb is not None else None
    extra = ("colour",) if colour is not None and colour > params.colour_max_fraction else ()
    mask, reason = scan_mask(img, params)
    if mask is None:
        info = CropInfo.whole(shape, reason)
        return img, info.flagged(*extra, colour_fraction=colour)
    area = float(mask.mean())
    if area < params.min_area:
        info = CropInfo.whole(shape, f"largest speckled region covers {area:.1%} of the image "
                                     f"(< {params.min_area:.0%})")
        return img, info.flagged(*extra, area_fraction=area, colour_fraction=colour)
    full = upsample_mask(mask, shape)
    box = _trim(img, bbox_of(full), params)
    top, left, bottom, right = box
    out = img[top:bottom, left:right]
    if params.mask_outside:
        out = np.where(full[top:bottom, left:right], out, np.float32(0))
    info = CropInfo(shape, box, area_fraction=area, colour_fraction=colour, flags=extra)
    return np.ascontiguousarray(out, dtype=np.float32), info
