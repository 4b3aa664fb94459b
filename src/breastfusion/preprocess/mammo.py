"""Mammogram preprocessing without physician input: crop to the breast, orient the chest wall.

Crop (`crop_breast`)
    1. A working copy, box-downsampled so its longer side is at most
       `MammoCrop.work_size` pixels (a 30 MPixel detector image costs the
       same as a 512 pixel one), median-filtered (`smooth`) so salt noise and
       film grain do not pass the threshold.
    2. Threshold. `method="background"` (default): ``t = bg + rel * (hi - bg)``
       with ``bg`` a low percentile (the background level, 0 for most files
       but not for every film scan or raw detector image) and ``hi`` a high
       percentile of the image. `method="otsu"`: Otsu's threshold (numpy, 256
       bins). Otsu is implemented and selectable but not the default: on
       contrast-subtracted CDD-CESM images the breast's own intensities are
       bimodal and Otsu splits the breast (it keeps only 30% of
       ``P107_R_CM_MLO``), whereas the background threshold keeps the whole
       breast on CDD-CESM and mini-MIAS alike.
    3. Light morphology: a binary opening (`open_radius`) cuts thin bridges
       between the breast and labels, markers or scanner streaks touching it,
       then the largest connected component (8-connected) is the breast; its
       holes are filled and it is dilated by `mask_dilate` so the skin line
       stays inside.
    4. The crop is the component's bounding box plus `margin` (a fraction of
       the image side); pixels outside the component are set to 0
       (`mask_outside`), which removes film labels and markers that fall
       inside the bounding box.

Fallback: the whole image, unchanged, with ``CropInfo.fallback=True`` and a
one-line reason, when the image has no contrast (blank, all black or all
white: ``ptp < min_contrast``), when nothing passes the threshold, or when
the largest component covers less than `min_area` of the image (a breast is
never that small; what is left is a label or noise). The criterion "touches no
image edge" is NOT used: mini-MIAS films are padded with black to 1024 x 1024
and many breasts there touch no edge at all.

Orientation (`orient`, `orient_info`, `chest_wall_side`)
    Convention (DICOM display, checked on the data here): the chest wall of a
    RIGHT breast is at the image's right edge, that of a LEFT breast at its
    left edge. mini-MIAS (odd mdb number = right breast, even = left) and
    CDD-CESM (``P<id>_<L|R>_...``) both follow it: with the content rule
    below, 322/322 mini-MIAS and 99% of CDD-CESM images put the chest wall
    where their laterality says (see the report of the module's author in
    the project history; tests/test_preprocess.py checks a sample).

    Content rule: the chest wall is the side of the breast mask with more
    breast mass. Per column of the cropped mask, count breast pixels; compare
    the outer `profile_band` fraction of columns on the left with that on the
    right. The side with the larger count is the chest wall when the ratio of
    the two is at least `min_ratio`; otherwise content is "unsure".

    When laterality and a sure content decision disagree, content wins and
    the info carries the flag ``laterality_mismatch``: the network needs the
    chest wall where the pixels put it, and a file can be stored mirrored
    relative to its laterality tag (images flipped by a third party or a
    viewer, film scans put on the scanner either way, datasets re-saved
    without the DICOM display rules). When content is unsure, laterality
    decides; when both are missing, the image is left as it is with the flag
    ``orientation_unknown``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from ..vocab import Side

ChestWall = Literal["left", "right"]


@dataclass(frozen=True)
class CropInfo:
    """What a crop did, in the input image's pixel coordinates.

    `bbox` is ``(top, left, bottom, right)``, half-open. `fallback` is True when
    the automatic crop was not trusted and the whole image was kept; `reason`
    says why in one line. `flags` are short words for anything a person
    should look at (``fallback``, ``colour``, ``greyed``, ``flipped``,
    ``laterality_mismatch``, ``orientation_unknown``...). `chest_wall` is the
    side of the *input* image where the chest wall was found or assumed.
    """

    shape: tuple[int, int]
    bbox: tuple[int, int, int, int]
    fallback: bool = False
    reason: str = ""
    area_fraction: float = 1.0
    flipped: bool = False
    chest_wall: str | None = None
    colour_fraction: float | None = None
    flags: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def whole(cls, shape: tuple[int, int], reason: str = "", *, fallback: bool = True) -> CropInfo:
        """The whole image as the crop: the documented fallback."""
        h, w = int(shape[0]), int(shape[1])
        return cls((h, w), (0, 0, h, w), fallback=fallback, reason=reason,
                   flags=("fallback",) if fallback else ())

    def flagged(self, *flags: str, **changes) -> CropInfo:
        """A copy with `flags` added (once each) and other fields replaced."""
        merged = tuple(dict.fromkeys((*self.flags, *flags)))
        return replace(self, flags=merged, **changes)

    def describe(self) -> str:
        """A short line for titles and logs."""
        top, left, bottom, right = self.bbox
        parts = [f"{bottom - top}x{right - left} of {self.shape[0]}x{self.shape[1]}"]
        if self.flags:
            parts.append(",".join(self.flags))
        if self.colour_fraction:
            parts.append(f"colour {self.colour_fraction:.2%}")
        return " ".join(parts)


@dataclass(frozen=True)
class MammoCrop:
    """Parameters of the mammogram breast crop and orientation (all part of the cache key).

    work_size: longer side (pixels) of the downsampled copy the mask is computed on.
    smooth: median filter size (work pixels) before thresholding; removes salt noise.
    method: "background" (bg + rel * (hi - bg)) or "otsu" (see the module docstring).
    bg_percentile, hi_percentile: percentiles giving the background and bright levels.
    rel: fraction of the background-to-bright range above the background that counts as breast.
    min_contrast: below this intensity range (image in [0, 1]) the image is blank: fallback.
    open_radius: radius (work pixels) of the opening that cuts thin bridges to labels.
    mask_dilate: dilation (work pixels) of the breast mask so the skin line stays in.
    margin: margin around the bounding box, as a fraction of the image's longer side.
    min_area: smallest plausible breast, as a fraction of the image area; smaller: fallback.
    mask_outside: set pixels outside the breast component to 0 (removes labels in the box).
    profile_band: fraction of the crop's columns at each side compared by the chest-wall rule.
    min_ratio: content decides the chest-wall side only when one side's mass is this many
        times the other's.
    """

    work_size: int = 512
    smooth: int = 5
    method: Literal["background", "otsu"] = "background"
    bg_percentile: float = 1.0
    hi_percentile: float = 99.5
    rel: float = 0.06
    min_contrast: float = 0.02
    open_radius: int = 3
    mask_dilate: int = 2
    margin: float = 0.01
    min_area: float = 0.05
    mask_outside: bool = True
    profile_band: float = 0.25
    min_ratio: float = 1.5

    def key(self) -> dict:
        return asdict(self)


# -- thresholds and masks -----------------------------------------------------------------------


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: maximises the between-class variance."""
    hist, edges = np.histogram(np.asarray(values, dtype=np.float64).ravel(), bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64)
    total = p.sum()
    if total == 0:
        return 0.5
    p /= total
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    mu = np.cumsum(p * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * (1.0 - w0))
    between = np.nan_to_num(between, nan=0.0, posinf=0.0)
    return float(edges[int(np.argmax(between)) + 1])


def downsample(img: np.ndarray, work_size: int) -> np.ndarray:
    """Box-downsample so the longer side is at most `work_size` (no copy when already small)."""
    h, w = img.shape
    scale = work_size / max(h, w)
    if scale >= 1:
        return img.astype(np.float32, copy=False)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    pil = Image.fromarray(img.astype(np.float32), mode="F")
    return np.asarray(pil.resize(size, Image.Resampling.BOX), dtype=np.float32)


def upsample_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a boolean mask to `shape`."""
    if mask.shape == tuple(shape):
        return mask
    rows = np.minimum((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0], mask.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1], mask.shape[1] - 1).astype(int)
    return mask[np.ix_(rows, cols)]


def disk(radius: int) -> np.ndarray:
    r = max(0, int(radius))
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (all False when empty)."""
    labels, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def bbox_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def breast_threshold(work: np.ndarray, params: MammoCrop) -> float:
    if params.method == "otsu":
        return otsu_threshold(work)
    if params.method != "background":
        raise ValueError(f"unknown threshold method {params.method!r} (expected background or otsu)")
    bg, hi = np.percentile(work, [params.bg_percentile, params.hi_percentile])
    return float(bg + params.rel * max(float(hi - bg), params.min_contrast))


def breast_mask(img: np.ndarray, params: MammoCrop = MammoCrop()) -> tuple[np.ndarray | None, str]:
    """Breast mask at the working resolution, or (None, reason) when the image has none."""
    work = downsample(np.asarray(img, dtype=np.float32), params.work_size)
    if work.size == 0 or float(np.ptp(work)) < params.min_contrast:
        return None, "no contrast (blank image)"
    if params.smooth > 1:
        work = ndi.median_filter(work, size=params.smooth, mode="nearest")
    fg = work > breast_threshold(work, params)
    if params.open_radius > 0:
        fg = ndi.binary_opening(fg, structure=disk(params.open_radius))
    comp = largest_component(fg)
    if not comp.any():
        return None, "nothing above the breast threshold"
    comp = ndi.binary_fill_holes(comp)
    if params.mask_dilate > 0:
        comp = ndi.binary_dilation(comp, structure=disk(params.mask_dilate))
    return comp, ""


# -- crop -----------------------------------------------------------------------------------------


def crop_breast(img: np.ndarray, params: MammoCrop = MammoCrop()) -> tuple[np.ndarray, CropInfo]:
    """Crop a grey mammogram (2D, [0, 1]) to the breast; see the module docstring."""
    img = np.asarray(img, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"crop_breast takes a 2D grey image, not shape {img.shape}")
    shape = (int(img.shape[0]), int(img.shape[1]))
    mask, reason = breast_mask(img, params)
    if mask is None:
        return img, CropInfo.whole(shape, reason)
    area = float(mask.mean())
    if area < params.min_area:
        info = CropInfo.whole(shape, f"largest component covers {area:.1%} of the image "
                                     f"(< {params.min_area:.0%})")
        return img, replace(info, area_fraction=area)
    full = upsample_mask(mask, shape)
    top, left, bottom, right = bbox_of(full)
    pad = int(round(params.margin * max(shape)))
    top, left = max(0, top - pad), max(0, left - pad)
    bottom, right = min(shape[0], bottom + pad), min(shape[1], right + pad)
    out = img[top:bottom, left:right]
    if params.mask_outside:
        out = np.where(full[top:bottom, left:right], out, np.float32(0))
    info = CropInfo(shape, (top, left, bottom, right), area_fraction=area)
    return np.ascontiguousarray(out, dtype=np.float32), info


# -- orientation --------------------------------------------------------------------------------


def laterality_chest_wall(side: Side | str | None) -> ChestWall | None:
    """Display convention: RIGHT breast -> chest wall at the right edge, LEFT -> left edge."""
    if side is None or side == "":
        return None
    return "right" if Side.parse(side) is Side.RIGHT else "left"


def chest_wall_side(img: np.ndarray, params: MammoCrop = MammoCrop()) -> tuple[ChestWall | None, float]:
    """The side of `img` where the chest wall is, from content, with the mass ratio.

    Returns (None, ratio) when the image has no breast mask or the ratio of the
    two sides' breast mass is below `params.min_ratio`.
    """
    mask, _ = breast_mask(img, params)
    if mask is None:
        return None, 1.0
    top, left, bottom, right = bbox_of(mask)
    cols = mask[top:bottom, left:right].sum(axis=0).astype(np.float64)
    band = max(1, int(round(params.profile_band * cols.size)))
    left_mass, right_mass = cols[:band].sum(), cols[-band:].sum()
    big, small = max(left_mass, right_mass), min(left_mass, right_mass)
    ratio = float(big / small) if small > 0 else float("inf") if big > 0 else 1.0
    if ratio < params.min_ratio:
        return None, ratio
    return ("left" if left_mass > right_mass else "right"), ratio


def orient_info(img: np.ndarray, side: Side | str | None, chest_wall: ChestWall = "left",
                info: CropInfo | None = None,
                params: MammoCrop = MammoCrop()) -> tuple[np.ndarray, CropInfo]:
    """Flip `img` so the chest wall is at `chest_wall`; return the image and updated info.

    Laterality (`side`) and content are combined as the module docstring says:
    a sure content decision wins and a disagreement is flagged.
    """
    if chest_wall not in ("left", "right"):
        raise ValueError(f"chest_wall must be 'left' or 'right', not {chest_wall!r}")
    img = np.asarray(img, dtype=np.float32)
    if info is None:
        info = CropInfo((int(img.shape[0]), int(img.shape[1])), (0, 0, *img.shape))
    expected = laterality_chest_wall(side)
    found, _ratio = chest_wall_side(img, params)
    flags: list[str] = []
    if found is not None:
        actual = found
        if expected is not None and expected != found:
            flags.append("laterality_mismatch")
    elif expected is not None:
        actual = expected
    else:
        return img, info.flagged("orientation_unknown", chest_wall=None)
    flip = actual != chest_wall
    if flip:
        img = np.ascontiguousarray(img[:, ::-1])
        flags.append("flipped")
    return img, info.flagged(*flags, flipped=flip, chest_wall=actual)


def orient(img: np.ndarray, side: Side | str | None, chest_wall: ChestWall = "left",
           params: MammoCrop = MammoCrop()) -> np.ndarray:
    """Flip `img` horizontally so the chest wall is on the `chest_wall` side (see `orient_info`)."""
    return orient_info(img, side, chest_wall, None, params)[0]
