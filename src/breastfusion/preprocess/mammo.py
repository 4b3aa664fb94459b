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
       bimodal and Otsu splits the breast (on ``P107_R_CM_MLO`` its component
       covers 25% of the image, the breast about 80%), whereas the
       background threshold keeps the whole breast on CDD-CESM and mini-MIAS
       alike (no fallback on any of their 1055 images here).
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
    Convention (DICOM display): the chest wall of a RIGHT breast is at the
    image's right edge, that of a LEFT breast at its left edge.

    Content rule, two cues over the breast mask's bounding box, both
    geometric so they hold for film, digital and contrast-subtracted images:
    (1) breast pixels in the outer `edge_band` of columns on each side: the
    chest wall is cut straight by the detector or film edge, the skin side
    tapers to the nipple; (2) breast intensity summed over the outer
    `mass_band` of columns on each side: the breast is thicker and wider at
    the chest wall. Content is *sure* when both cues point to the same side,
    each with a side ratio of at least `min_ratio`. (A third cue, the
    brightness just inside the skin line, is right on every film mammogram of
    mini-MIAS and wrong on most CDD-CESM subtracted images, whose skin line is
    bright; it is not used.)

    Checked on the data in ../shared/datasets (all 258 mini-MIAS and 797
    CDD-CESM images, default parameters): content is sure for 1034 images
    and agrees with the laterality convention for every one of them (21
    unsure: 8 mini-MIAS, 13 CDD-CESM; 0 contradictions).
    mini-MIAS: odd mdb numbers (right breasts) have the chest wall at the
    right edge, even numbers (left breasts) at the left edge. CDD-CESM:
    ``P<id>_R_...`` right edge, ``P<id>_L_...`` left edge. Both follow the
    convention; nothing dataset-specific is needed.

    When laterality and sure content disagree, content wins and the info
    carries the flag ``laterality_mismatch``: the network needs the chest
    wall where the pixels put it, and a file can be stored mirrored relative
    to its laterality tag (images flipped by a viewer or a third party, film
    put on the scanner either way, datasets re-saved without the DICOM
    display rules, a wrong tag). When content is unsure, laterality decides;
    when both are missing, the image is left as it is with the flag
    ``orientation_unknown``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from ..choices import ChestWall
from ..vocab import Side


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

    def notes(self) -> tuple[str, ...]:
        """What a person should know about this image's preprocessing, one `NOTES` key each
        ("fallback", "colour_greyed", ...): flags that say the result is not the usual one."""
        return tuple(f for f in self.flags if f in NOTES)

    def describe(self) -> str:
        """A short line for titles and logs."""
        top, left, bottom, right = self.bbox
        parts = [f"{bottom - top}x{right - left} of {self.shape[0]}x{self.shape[1]}"]
        if self.flipped:
            parts.append("flipped")
        if self.flags:
            parts.append(",".join(self.flags))
        if self.colour_fraction is not None and any(f.startswith("colour") for f in self.flags):
            parts.append(f"colour {self.colour_fraction:.2%}")
        return " ".join(parts)


# Preprocessing outcomes that are reported (instances.csv, HTML reports, run reports), with the
# words they are reported in. "fallback" is the documented fallback of both crops.
NOTES: dict[str, str] = {
    "fallback": "whole image kept (no breast or scan area found)",
    "colour_greyed": "colour image converted to grey",
    "laterality_mismatch": "chest wall found on the side the laterality does not say",
    "orientation_unknown": "chest wall not found (orientation as the laterality says)",
    "overlays_removed": "marks drawn on the image removed",
}


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
    edge_band: fraction of the breast box's columns at each side whose breast pixels are
        compared (chest-wall cue 1: the chest wall is cut straight, the skin side tapers).
    mass_band: fraction of the columns at each side whose breast intensity is compared (cue 2).
    min_ratio: content decides the chest-wall side only when both cues agree and each
        side ratio is at least this.
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
    edge_band: float = 0.05
    mass_band: float = 0.10
    min_ratio: float = 1.2

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
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))  # a plateau over empty bins: its middle
    return float(edges[int(round((best[0] + best[-1]) / 2)) + 1])


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
    out, info, _ = crop_breast_mask(img, params)
    return out, info


def crop_breast_mask(img: np.ndarray,
                     params: MammoCrop = MammoCrop()) -> tuple[np.ndarray, CropInfo, np.ndarray | None]:
    """`crop_breast`, plus the breast mask of the cropped image (None on fallback)."""
    img = np.asarray(img, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"crop_breast takes a 2D grey image, not shape {img.shape}")
    shape = (int(img.shape[0]), int(img.shape[1]))
    mask, reason = breast_mask(img, params)
    if mask is None:
        return img, CropInfo.whole(shape, reason), None
    area = float(mask.mean())
    if area < params.min_area:
        info = CropInfo.whole(shape, f"largest component covers {area:.1%} of the image "
                                     f"(< {params.min_area:.0%})")
        return img, replace(info, area_fraction=area), None
    full = upsample_mask(mask, shape)
    top, left, bottom, right = bbox_of(full)
    pad = int(round(params.margin * max(shape)))
    top, left = max(0, top - pad), max(0, left - pad)
    bottom, right = min(shape[0], bottom + pad), min(shape[1], right + pad)
    out = img[top:bottom, left:right]
    inside = full[top:bottom, left:right]
    if params.mask_outside:
        out = np.where(inside, out, np.float32(0))
    info = CropInfo(shape, (top, left, bottom, right), area_fraction=area)
    return np.ascontiguousarray(out, dtype=np.float32), info, inside


# -- orientation --------------------------------------------------------------------------------


def laterality_chest_wall(side: Side | str | None) -> ChestWall | None:
    """Display convention: RIGHT breast -> chest wall at the right edge, LEFT -> left edge."""
    if side is None or side == "":
        return None
    return ChestWall.RIGHT if Side.parse(side) is Side.RIGHT else ChestWall.LEFT


def chest_wall_side(img: np.ndarray, params: MammoCrop = MammoCrop(),
                    mask: np.ndarray | None = None) -> tuple[ChestWall | None, float]:
    """The side of `img` where the chest wall is, from content, with the weaker cue's ratio.

    Two cues over the breast mask's bounding box (see the module docstring):
    breast pixels in the outer `edge_band` of columns on each side (the chest
    wall is cut straight by the detector or film edge, the skin side tapers
    to the nipple), and breast intensity in the outer `mass_band` of columns
    on each side. The answer is sure only when both
    cues point to the same side, each with a ratio of at least
    `params.min_ratio`; otherwise it is (None, ratio). `mask`, when given, is
    the breast mask of `img` (same shape); else it is computed.
    """
    img = np.asarray(img, dtype=np.float32)
    if mask is None:
        mask, _ = breast_mask(img, params)
        if mask is None:
            return None, 1.0
        img = downsample(img, params.work_size)
        if img.shape != mask.shape:  # rounding of an odd size: match the mask
            img = np.asarray(Image.fromarray(img, mode="F").resize(mask.shape[::-1]), dtype=np.float32)
    if not mask.any():
        return None, 1.0
    top, left, bottom, right = bbox_of(mask)
    box = mask[top:bottom, left:right]
    width = box.shape[1]
    edge = max(1, int(round(params.edge_band * width)))
    band = max(1, int(round(params.mass_band * width)))
    cols = box.sum(axis=0, dtype=np.float64)
    weighted = np.where(box, img[top:bottom, left:right], 0).sum(axis=0, dtype=np.float64)
    votes = []
    for profile, k in ((cols, edge), (weighted, band)):
        lo, hi = profile[:k].sum(), profile[-k:].sum()
        big, small = max(lo, hi), min(lo, hi)
        ratio = float(big / small) if small > 0 else (float("inf") if big > 0 else 1.0)
        votes.append((ChestWall.LEFT if lo > hi else ChestWall.RIGHT, ratio))
    ratio = min(r for _, r in votes)
    if votes[0][0] != votes[1][0] or ratio < params.min_ratio:
        return None, ratio
    return votes[0][0], ratio


def orient_info(img: np.ndarray, side: Side | str | None, chest_wall: ChestWall = ChestWall.LEFT,
                info: CropInfo | None = None, params: MammoCrop = MammoCrop(),
                mask: np.ndarray | None = None) -> tuple[np.ndarray, CropInfo]:
    """Flip `img` so the chest wall is at `chest_wall`; return the image and the updated info.

    Laterality (`side`) and content are combined as the module docstring says:
    a sure content decision wins and a disagreement is flagged
    (``laterality_mismatch``); unsure content defers to laterality; neither
    leaves the image as it is (``orientation_unknown``). `mask` is the breast
    mask of `img` when the caller has it (from `crop_breast_mask`).
    """
    if chest_wall not in (ChestWall.LEFT, ChestWall.RIGHT):
        raise ValueError(f"chest_wall must be 'left' or 'right', not {chest_wall!r}")
    img = np.asarray(img, dtype=np.float32)
    if info is None:
        info = CropInfo((int(img.shape[0]), int(img.shape[1])), (0, 0, int(img.shape[0]), int(img.shape[1])))
    expected = laterality_chest_wall(side)
    found, _ratio = chest_wall_side(img, params, mask)
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
    return img, info.flagged(*flags, flipped=flip, chest_wall=actual)


def orient(img: np.ndarray, side: Side | str | None, chest_wall: ChestWall = ChestWall.LEFT,
           params: MammoCrop = MammoCrop()) -> np.ndarray:
    """Flip `img` horizontally so the chest wall is on the `chest_wall` side (see `orient_info`)."""
    return orient_info(img, side, chest_wall, None, params)[0]
