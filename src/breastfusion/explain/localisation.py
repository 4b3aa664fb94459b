"""How well a heatmap points at the annotated lesion, against a centre prior.

Scores, per image with a lesion annotation (in the model's input space):

* pointing game (Zhang et al. 2016): a hit when the heatmap's maximum lies
  inside the lesion;
* energy inside: the share of the heatmap's total mass that falls inside the
  lesion (1 for a heatmap entirely on the lesion; the lesion's area fraction
  for a flat heatmap).

The baseline is a centre prior: an isotropic Gaussian at the image centre
(sigma a quarter of the side), scored on the same images. A heatmap that does
not beat it says nothing about the lesion that "lesions are near the middle"
does not.

Annotations live in source-image pixels; `to_model_space` maps them through
the same crop, flip, square padding and resize as the image (CropInfo).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..preprocess.images import pad_to_square
from ..preprocess.mammo import CropInfo


def to_model_space(mask: np.ndarray, info: CropInfo, size: int) -> np.ndarray:
    """A source-image mask (H, W) -> the (size, size) boolean mask on the model's input."""
    if mask.shape != tuple(info.shape):
        raise ValueError(f"mask shape {mask.shape} is not the image shape {info.shape}")
    top, left, bottom, right = info.bbox
    cropped = mask[top:bottom, left:right].astype(np.float32)
    if info.flipped:
        cropped = cropped[:, ::-1]
    square = pad_to_square(np.ascontiguousarray(cropped))
    resized = Image.fromarray(square, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized) >= 0.5


def circle_mask(shape: tuple[int, int], centre_xy: tuple[float, float], radius: float) -> np.ndarray:
    """A filled circle (x = column, y = row, both in pixels from the top-left)."""
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    x, y = centre_xy
    return (cols - x) ** 2 + (rows - y) ** 2 <= radius**2


def centre_prior(size: int, sigma_fraction: float = 0.25) -> np.ndarray:
    """The baseline heatmap: a Gaussian at the centre of a (size, size) image, max 1."""
    coords = np.arange(size) - (size - 1) / 2
    g = np.exp(-(coords**2) / (2 * (sigma_fraction * size) ** 2))
    return np.outer(g, g).astype(np.float32)


def pointing_hit(heatmap: np.ndarray, lesion: np.ndarray) -> bool:
    """True when the heatmap's maximum (first one, row-major) lies inside the lesion."""
    r, c = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return bool(lesion[r, c])


def energy_inside(heatmap: np.ndarray, lesion: np.ndarray) -> float:
    """Share of the heatmap's (non-negative) mass inside the lesion; NaN for an all-zero map."""
    heat = np.clip(heatmap.astype(np.float64), 0, None)
    total = heat.sum()
    return float(heat[lesion].sum() / total) if total > 0 else float("nan")


@dataclass
class Score:
    """One annotated image's scores for a heatmap and for the centre prior."""

    image: str
    label: str
    hit: bool
    energy: float
    prior_hit: bool
    prior_energy: float
    lesion_fraction: float  # lesion area / image area


def score(image: str, label: str, heatmap: np.ndarray, lesion: np.ndarray) -> Score:
    prior = centre_prior(heatmap.shape[0])
    return Score(image, label, pointing_hit(heatmap, lesion), energy_inside(heatmap, lesion),
                 pointing_hit(prior, lesion), energy_inside(prior, lesion), float(lesion.mean()))


def summarize(scores: Iterable[Score]) -> list[dict]:
    """Per class (and all together): n, hit rate and mean energy, for Grad-CAM and the centre prior."""
    scores = list(scores)
    groups: dict[str, list[Score]] = {}
    for s in scores:
        groups.setdefault(s.label, []).append(s)
    groups["all"] = scores
    rows = []
    for label, items in groups.items():
        if not items:
            continue
        rows.append({
            "class": label, "n": len(items),
            "gradcam_hit_rate": float(np.mean([s.hit for s in items])),
            "prior_hit_rate": float(np.mean([s.prior_hit for s in items])),
            "gradcam_energy": float(np.nanmean([s.energy for s in items])),
            "prior_energy": float(np.nanmean([s.prior_energy for s in items])),
            "lesion_fraction": float(np.mean([s.lesion_fraction for s in items])),
        })
    return rows
