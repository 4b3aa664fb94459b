"""A seeded synthetic cohort: the project's embedded default data for demos and tests.

Each patient is one breast (id ``S0001``..., side L/R at random) with a label drawn
to match ``class_fractions`` exactly (largest-remainder rounding, then shuffled; at
least 1 patient per class when n >= 3, 2 when n >= 30). It gets four mammograms
(CC and MLO, each standard 2D and synthesized 2D) and k ultrasound images, k uniform
in ``us_per_patient``. Every random draw of a patient comes from its own child seed
(``SeedSequence(seed, spawn_key=(i,))``), so the same config gives byte-identical
files. Nothing below is tuned against a classifier; the model only makes the
modalities behave qualitatively like the paper's.

Anatomy (independent of the label: breast size, density, geometry, gain and
windowing all have the same distribution in every class)
  One patient = one 'tissue field' (smoothed multi-scale noise, partly stretched
  towards the nipple like ducts) and one density in [0.1, 0.85]. Each MG view
  samples this field inside its own breast outline, so CC and MLO show the same
  anatomy, roughly; the lesion sits at the same (depth, height) in the breast.

Mammography (MG): separates malignant well, benign vs normal poorly
  A half-ellipse of tissue against the chest wall (LEFT image edge for side L,
  RIGHT for side R), dark background. CC is near-semicircular; MLO is longer, runs
  up to the axilla and has a bright pectoral-muscle triangle in the upper corner at
  the chest wall. Brightness = 1 - exp(-attenuation), so dense tissue also
  compresses a lesion's contrast. Half the images have a small bright label
  marker in a background corner.
  - malignant: spiculated mass (irregular bright core, thin radiating lines) plus a
    cluster of 4-9 tiny very bright microcalcifications: clearly visible.
  - benign: smooth round/oval mass of LOW contrast, easily lost in dense tissue;
    occult on MG (not drawn) in 40% of benign patients.
  - every patient (all classes alike) has a 30% chance of a benign-looking smooth
    blob (cyst, lymph node) elsewhere: the confounder that makes benign vs normal
    hard. It is not a lesion (lesion=0).
  Standard 2D vs synthesized 2D (C-View): 2D images carry strong superimposed
  'overlapping tissue' noise, a slight blur, 0.8x lesion contrast and blurred
  lesion edges; synthesized images carry a third of that overlap noise, full
  lesion contrast with sharp edges, and an unsharp-mask, higher-contrast look.

Ultrasound (US): separates normal vs lesion well, benign vs malignant poorly
  A rectangular or sector scan area (per patient: one scanner) on a black canvas
  with scanner UI outside it (text-like blocks, depth ticks, a probe marker).
  Layers with undulating boundaries: bright skin line, darker subcutaneous fat,
  bright textured glandular layer, dark retromammary fat, striated muscle; depth
  attenuation with random time-gain compensation; multiplicative Rayleigh speckle
  (magnitude of smoothed complex noise); random log-compression.
  - benign and malignant: a dark (hypoechoic) mass in the glandular layer. Three
    features - taller-than-wide (else wider-than-tall), slightly irregular margin
    (else smooth), posterior shadowing (else posterior enhancement) - are each
    present, independently, in 60% of malignant and 35% of benign patients.
  - each US image of a lesion patient shows the lesion with probability 0.85 at a
    random position and tilt (a sweep can miss it; such images get lesion=0).
  - any image (all classes) may show a small dark fat lobule (20%): a mild
    confounder, not a lesion.
Lesion radius is 6-12% of the image size. Every image is finally windowed on
its own breast/scan area (2nd percentile and median mapped to random levels, then
a random gamma), so global brightness is not a label cue: a bright lesion does not
move the median, so it does not dim the rest of the image.

Outputs under ``out_dir``: ``images/<id>/<id>_MG_<view>_<kind>.png`` and
``images/<id>/<id>_US_<i>.png`` (8-bit greyscale), ``manifest.csv`` (via
``records.write_manifest``) and ``lesions.csv``: path (relative, posix),
patient_id, modality, lesion (1 if a lesion is drawn visibly in that image), cx,
cy, radius in pixels (x = column, y = row; empty when lesion=0). The radius is the
mass's mean semi-axis; spicules reach about twice the radius.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter, map_coordinates
from scipy.special import expit, ndtr, ndtri

from ..records import ImageRecord, write_manifest
from ..vocab import LABELS, Kind, Label, Modality, Side, View

LESION_COLUMNS = ("path", "patient_id", "modality", "lesion", "cx", "cy", "radius")

# Physical parameters of the model (see the module docstring).
BENIGN_MG_OCCULT = 0.4  # benign masses not drawn at all on MG
MG_BLOB_RATE = 0.3  # benign-looking blob, any class
US_FEATURE_RATE = {Label.BENIGN: 0.35, Label.MALIGNANT: 0.6}  # per suspicious US feature
US_LESION_SEEN = 0.85  # a US image of a lesion patient shows the lesion
US_LOBULE_RATE = 0.2  # small dark fat lobule, any US image
MARKER_RATE = 0.5  # MG label marker in a background corner
FIELD_SIZE = 64  # tissue field grid


@dataclass
class SynthConfig:
    n_patients: int = 300
    image_size: int = 128  # square images, px
    us_per_patient: tuple[int, int] = (1, 4)  # inclusive range of US images per patient
    class_fractions: tuple[float, float, float] = (0.534, 0.357, 0.109)  # paper's 668/446/136
    seed: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.us_per_patient
        if self.n_patients < 1 or self.image_size < 32 or not 1 <= lo <= hi or self.seed < 0:
            raise ValueError(f"invalid SynthConfig: {self}")
        if len(self.class_fractions) != 3 or min(self.class_fractions) < 0 \
                or sum(self.class_fractions) <= 0:
            raise ValueError(f"class_fractions must be 3 non-negative numbers: {self}")


@dataclass
class _Patient:
    label: Label
    side: Side
    density: float
    tissue: np.ndarray  # FIELD_SIZE^2 standard-normal field, rows = height, cols = depth
    geometry: dict  # View -> breast outline parameters (shared by 2D and synthesized)
    mass: dict | None = None  # MG lesion, or None (normal, or occult benign)
    blob: dict | None = None  # MG benign-looking confounder
    us_lesion: dict | None = None
    us_sector: bool = False


# ----------------------------------------------------------------------------- helpers
@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _smooth_noise(rng: np.random.Generator, shape, sigma) -> np.ndarray:
    """Gaussian-smoothed white noise, standardised to mean 0, std 1."""
    n = gaussian_filter(rng.standard_normal(shape), sigma)
    return (n - n.mean()) / (n.std() + 1e-12)


def _soft_shape(x, y, cx, cy, ax, ay, theta, edge_px, harmonics=()) -> np.ndarray:
    """0..1 mask of a rotated ellipse whose boundary is modulated by angular harmonics."""
    c, s = np.cos(theta), np.sin(theta)
    xr = ((x - cx) * c + (y - cy) * s) / ax
    yr = (-(x - cx) * s + (y - cy) * c) / ay
    rn = np.hypot(xr, yr)
    boundary = 1.0
    if harmonics:
        phi = np.arctan2(yr, xr)
        boundary = 1.0 + sum(a * np.cos(k * phi + ph) for k, a, ph in harmonics)
    return expit((boundary - rn) * np.sqrt(ax * ay) / edge_px)


def _window(img, roi, rng, lo, mid) -> np.ndarray:
    """Map the ROI's 2nd percentile and median to random levels lo, mid; random gamma.

    Anchoring on the median (not a top percentile) keeps a bright lesion from
    changing the rest of the image's brightness.
    """
    p2, p50 = np.percentile(img[roi], (2, 50))
    lo, mid = rng.uniform(*lo), rng.uniform(*mid)
    out = np.clip(lo + (img - p2) * (mid - lo) / max(p50 - p2, 1e-6), 0.0, 1.0)
    return out ** rng.uniform(0.85, 1.2)


def _to_uint8(img) -> np.ndarray:
    return np.ascontiguousarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8))


def _class_counts(n: int, fractions) -> np.ndarray:
    """Exact per-class counts: largest remainder, then a floor of 1 (n>=3) or 2 (n>=30)."""
    f = np.asarray(fractions, float) / sum(fractions)
    counts = np.floor(n * f).astype(int)
    order = np.argsort(-(n * f - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    floor = 2 if n >= 30 else 1 if n >= 3 else 0
    for c in range(3):
        while counts[c] < floor:
            counts[np.argmax(counts)] -= 1
            counts[c] += 1
    return counts


# ----------------------------------------------------------------------------- patient
def _draw_patient(rng: np.random.Generator, label: Label, size: int) -> _Patient:
    """Label-independent anatomy first, then the lesion that the label implies."""
    side = Side.LEFT if rng.random() < 0.5 else Side.RIGHT
    g = FIELD_SIZE
    tissue = (_smooth_noise(rng, (g, g), 4.0) + 0.8 * _smooth_noise(rng, (g, g), 1.2)
              + 0.5 * _smooth_noise(rng, (g, g), (1.2, 4.0)))  # (height, depth): duct-like
    tissue = (tissue - tissue.mean()) / tissue.std()
    scale = rng.uniform(0.82, 1.0)
    geometry = {
        View.CC: dict(a=0.78 * scale * size, cy=rng.uniform(0.46, 0.54) * size,
                      b_up=0.42 * scale * size, b_low=0.42 * scale * size, pect=None),
        View.MLO: dict(a=0.72 * scale * size, cy=rng.uniform(0.52, 0.6) * size,
                       b_up=0.8 * size, b_low=0.4 * scale * size,
                       pect=(rng.uniform(0.2, 0.32) * size, rng.uniform(0.45, 0.7) * size)),
    }
    p = _Patient(label, side, rng.uniform(0.1, 0.85), tissue, geometry,
                 us_sector=bool(rng.random() < 0.5))
    if rng.random() < MG_BLOB_RATE:
        p.blob = _oval_params(rng, rng.uniform(0.06, 0.1) * size) | _mg_location(rng)
    if label is Label.NORMAL:
        return p
    radius = rng.uniform(0.06, 0.12) * size
    if label is Label.MALIGNANT:
        n_spic, n_calc = rng.integers(8, 17), rng.integers(4, 10)
        calc_r = 0.9 * radius * np.sqrt(rng.random(n_calc))  # uniform in a disc
        calc_a = rng.uniform(0, 2 * np.pi, n_calc)
        p.mass = dict(kind="spiculated", radius=radius, ax=radius, ay=radius, theta=0.0,
                      contrast=rng.uniform(0.8, 1.1),
                      harmonics=[(k, rng.uniform(0.03, 0.08), rng.uniform(0, 2 * np.pi))
                                 for k in range(2, 9)],
                      spic_angle=rng.uniform(0, 2 * np.pi, n_spic),
                      spic_len=radius * rng.uniform(1.6, 2.8, n_spic),
                      calc_dx=calc_r * np.cos(calc_a), calc_dy=calc_r * np.sin(calc_a),
                      calc_amp=rng.uniform(0.35, 0.6, n_calc))
    elif rng.random() >= BENIGN_MG_OCCULT:
        p.mass = _oval_params(rng, radius)
    if p.mass is not None:
        p.mass |= _mg_location(rng)
    rate = US_FEATURE_RATE[label]
    taller, irregular, shadow = (bool(rng.random() < rate) for _ in range(3))
    k = rng.uniform(0.7, 0.9) if taller else rng.uniform(1.25, 1.6)
    r_us = radius * rng.uniform(0.9, 1.1)
    amp = (0.07, 0.14) if irregular else (0.0, 0.03)
    p.us_lesion = dict(ax=r_us * k, ay=r_us / k, shadow=shadow,
                       harmonics=[(h, rng.uniform(*amp), rng.uniform(0, 2 * np.pi))
                                  for h in (5, 7, 9)])
    return p


def _oval_params(rng, radius) -> dict:
    k = rng.uniform(1.0, 1.4)
    return dict(kind="oval", radius=radius, ax=radius * k, ay=radius / k,
                theta=rng.uniform(0, np.pi), contrast=rng.uniform(0.1, 0.2), harmonics=())


def _mg_location(rng) -> dict:
    """Position in breast coordinates: u = depth from chest wall, v = height (-1..1)."""
    while True:
        u, v = rng.uniform(0.25, 0.7), rng.uniform(-0.55, 0.55)
        if u * u + v * v < 0.55:
            return dict(u=u, v=v)


def _mg_centre(g: dict, obj: dict, view: View) -> tuple[float, float]:
    """Pixel centre of a lesion in a view (chest wall at x = 0), clear of the pectoral."""
    v = obj["v"] if view is View.CC else 0.85 * obj["v"] - 0.1
    x, y = obj["u"] * g["a"], g["cy"] + v * g["b_low"]
    if g["pect"] is not None:
        pw, ph = g["pect"]
        x = max(x, pw * (1.0 - y / ph) + obj["radius"])
    return x, y


# ----------------------------------------------------------------------------- mammography
def _draw_breast(p: _Patient, view: View, size: int):
    """Outline mask, thickness profile, fibroglandular fraction and pectoral mask."""
    x, y = _grid(size)
    g = p.geometry[view]
    dx = x / g["a"]
    dy = (y - g["cy"]) / np.where(y < g["cy"], g["b_up"], g["b_low"])
    rho = np.hypot(dx, dy)
    mask = expit((1.0 - rho) * g["b_low"] / 1.5)
    thick = np.clip(1.0 - rho**2, 0, 1) ** 0.25  # compressed breast: flat, thin at the skin
    coords = [(np.clip(dy, -1, 1) + 1) / 2 * (FIELD_SIZE - 1), np.clip(dx, 0, 1) * (FIELD_SIZE - 1)]
    tissue = map_coordinates(p.tissue, coords, order=1, mode="nearest")
    fg = ndtr((tissue - ndtri(1.0 - p.density)) / 0.6) * np.clip((1.0 - rho) / 0.25, 0, 1)
    pect = np.zeros_like(x)
    if g["pect"] is not None:
        pw, ph = g["pect"]
        pect = expit((1.0 - x / pw - y / ph) * 40.0) * mask
    return mask, thick, fg, pect


def _draw_spiculated_mass(x, y, cx, cy, m, edge) -> np.ndarray:
    """Irregular core plus thin tapering bright lines radiating from the centre."""
    core = _soft_shape(x, y, cx, cy, m["radius"], m["radius"], 0.0, edge, m["harmonics"])
    ang = m["spic_angle"][:, None, None]
    along = (x - cx) * np.cos(ang) + (y - cy) * np.sin(ang)
    perp = -(x - cx) * np.sin(ang) + (y - cy) * np.cos(ang)
    length = m["spic_len"][:, None, None]
    taper = np.clip(1.0 - along / length, 0, 1) * (along > 0)
    lines = np.exp(-(perp**2) / (2 * (0.5 + 0.5 * edge) ** 2)) * taper
    return core + 0.5 * lines.max(axis=0)


def _draw_calcifications(x, y, cx, cy, m, sigma) -> np.ndarray:
    dx = x - (cx + m["calc_dx"])[:, None, None]
    dy = y - (cy + m["calc_dy"])[:, None, None]
    dots = np.exp(-(dx**2 + dy**2) / (2 * sigma**2)) * m["calc_amp"][:, None, None]
    return dots.sum(axis=0)


def _draw_marker(img, rng, size) -> None:
    """Small bright label marker with dark 'letters', in a nipple-side background corner."""
    sc = size / 128
    w, h = int(rng.uniform(10, 15) * sc), int(rng.uniform(5, 8) * sc)
    x0 = size - w - int(rng.uniform(2, 6) * sc)
    y0 = int(rng.uniform(2, 6) * sc) if rng.random() < 0.5 else size - h - int(4 * sc)
    img[y0:y0 + h, x0:x0 + w] = rng.uniform(0.85, 1.0)
    for i in range(1, w - 1, max(2, int(3 * sc))):
        if rng.random() < 0.6:
            img[y0 + 1:y0 + h - 1, x0 + i] = 0.3


def _render_mammogram(p: _Patient, view: View, kind: Kind, size: int, rng):
    """One MG image (chest wall at the left edge) and its lesion (cx, cy, r) or None."""
    x, y = _grid(size)
    sc = size / 128
    synth = kind is Kind.SYNTHESIZED
    mask, thick, fg, pect = _draw_breast(p, view, size)
    overlap = _smooth_noise(rng, (size, size), 2.5 * sc) * (0.07 if synth else 0.22)
    overlap += _smooth_noise(rng, (size, size), 1.0 * sc) * (0.03 if synth else 0.08)
    density = thick * (0.5 + 0.6 * fg + overlap)
    lesion_map = np.zeros_like(x)
    calcs = np.zeros_like(x)
    edge, gain = (0.6 * sc, 1.0) if synth else (1.5 * sc, 0.8)
    for obj in (p.blob, p.mass):
        if obj is None:
            continue
        cx, cy = _mg_centre(p.geometry[view], obj, view)
        if obj["kind"] == "spiculated":
            shape = _draw_spiculated_mass(x, y, cx, cy, obj, edge)
            calcs += gain * _draw_calcifications(x, y, cx, cy, obj, 0.55 * sc)
        else:
            shape = _soft_shape(x, y, cx, cy, obj["ax"], obj["ay"], obj["theta"],
                                0.15 * obj["radius"] + edge)
        lesion_map += gain * obj["contrast"] * shape
    if not synth:
        lesion_map = gaussian_filter(lesion_map, 1.0 * sc)
    density = density + lesion_map
    density = density * (1 - pect) + pect * (1.1 + 0.05 * overlap)
    img = (1.0 - np.exp(-density * mask)) + calcs * mask
    if synth:
        img = img + 0.8 * (img - gaussian_filter(img, 1.5 * sc))  # sharper look
    else:
        img = gaussian_filter(img, 0.6 * sc)
    roi = (mask > 0.5) & (pect < 0.5)
    img = _window(img, roi, rng, (0.05, 0.15) if synth else (0.15, 0.25), (0.45, 0.55))
    img = (img + rng.normal(0, 0.012, img.shape)) * np.clip(mask * 1.2, 0, 1)
    img = np.maximum(img, np.abs(rng.normal(0, 0.015, img.shape)))  # dark, noisy background
    if rng.random() < MARKER_RATE:
        _draw_marker(img, rng, size)
    lesion = None
    if p.mass is not None:
        lesion = (*_mg_centre(p.geometry[view], p.mass, view),
                  (p.mass["ax"] + p.mass["ay"]) / 2)
    return _to_uint8(img), lesion


# ----------------------------------------------------------------------------- ultrasound
def _scan_geometry(p: _Patient, size: int, rng):
    """Beam coordinates (t lateral 0..1, r depth 0..1) of every pixel, and helpers."""
    x, y = _grid(size)
    y0, span = rng.uniform(0.1, 0.14) * size, rng.uniform(0.78, 0.84) * size
    if not p.us_sector:
        x0 = rng.uniform(0.12, 0.2) * size
        x1 = size - rng.uniform(0.12, 0.2) * size
        t, r = (x - x0) / (x1 - x0), (y - y0) / span

        def to_px(t0, r0):
            return x0 + t0 * (x1 - x0), y0 + r0 * span

        t_px = np.full_like(t, x1 - x0)  # pixels per unit of t
        right = x1
    else:
        r_apex = rng.uniform(0.1, 0.2) * size
        half = np.arcsin(0.44 * size / (r_apex + span)) * rng.uniform(0.8, 1.0)
        ax, ay = size / 2, y0 - r_apex
        dist, ang = np.hypot(x - ax, y - ay), np.arctan2(x - ax, y - ay)
        t, r = ang / (2 * half) + 0.5, (dist - r_apex) / span

        def to_px(t0, r0):
            a, d = (t0 - 0.5) * 2 * half, r_apex + r0 * span
            return ax + d * np.sin(a), ay + d * np.cos(a)

        t_px = 2 * half * dist  # arc length per unit of t
        right = ax + (r_apex + span) * np.sin(half)
    scan = (t >= 0) & (t <= 1) & (r >= 0) & (r <= 1)
    return t, r, scan, to_px, t_px, dict(y0=y0, span=span, right=right)


def _draw_us_layers(t, r, rng, size) -> np.ndarray:
    """Echogenicity of skin, fat, glandular layer, retromammary fat and muscle."""
    sc = size / 128

    def boundary(base, amp):
        return base + amp * np.sin(2 * np.pi * (rng.uniform(0.5, 2.0) * t + rng.random()))

    coarse = _smooth_noise(rng, t.shape, 2.5 * sc)
    fine = _smooth_noise(rng, t.shape, 1.0 * sc)
    layers = [  # (upper boundary in depth units, echogenicity below it)
        (boundary(rng.uniform(0.025, 0.04), 0.005), 0.3 + 0.1 * coarse),
        (boundary(rng.uniform(0.18, 0.28), 0.04), 1.0 + 0.25 * fine + 0.1 * coarse),
        (boundary(rng.uniform(0.6, 0.7), 0.05), 0.25 + 0.08 * coarse),
        (boundary(rng.uniform(0.82, 0.9), 0.03), 0.5 + 0.2 * np.sin(r * size / 3)),
    ]
    echo = np.ones_like(t)  # skin line
    for edge, value in layers:
        s = expit((r - edge) / 0.008)
        echo = echo * (1 - s) + value * s
    return np.clip(echo, 0.02, None)


def _draw_hypoechoic_mass(echo, x, y, cx, cy, ax, ay, theta, harmonics, rng, sc):
    m = _soft_shape(x, y, cx, cy, ax, ay, theta, 0.8 * sc, harmonics)
    return echo * (1 - m) + m * rng.uniform(0.06, 0.14)


def _draw_scanner_ui(img, rng, geo, size) -> None:
    """Text-like blocks above the scan area, depth ticks beside it, a probe marker."""
    sc = size / 128
    bh = max(2, int(3 * sc))
    for line in range(rng.integers(1, 3)):
        xx, yy = int(rng.uniform(2, 8) * sc), int((2 + 5 * line) * sc)
        if rng.random() < 0.5:
            xx = size - xx - int(30 * sc)
        for _ in range(rng.integers(3, 8)):
            w = int(rng.integers(2, 5) * sc)
            img[yy:yy + bh, xx:xx + w] = rng.uniform(0.6, 1.0)
            xx += w + max(1, int(sc))
    tx = int(min(geo["right"] + 3 * sc, size - 4 * sc))
    for k in range(6):
        ty = int(geo["y0"] + k * geo["span"] / 5)
        img[min(ty, size - 1), tx:tx + max(2, int(3 * sc))] = 0.8
    img[int(geo["y0"] - 4 * sc):int(geo["y0"] - 2 * sc), int(2 * sc):int(4 * sc)] = 0.9


def _render_ultrasound(p: _Patient, size: int, rng):
    """One US image and its lesion (cx, cy, r) or None."""
    x, y = _grid(size)
    sc = size / 128
    t, r, scan, to_px, t_px, geo = _scan_geometry(p, size, rng)
    echo = _draw_us_layers(t, r, rng, size)
    lesion = None
    if rng.random() < US_LOBULE_RATE:  # small dark fat lobule: confounder in any class
        cx, cy = to_px(rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.2))
        rad = rng.uniform(0.03, 0.05) * size
        echo = _draw_hypoechoic_mass(echo, x, y, cx, cy, rad * 1.5, rad / 1.5, 0.0, (), rng, sc)
    les = p.us_lesion
    if les is not None and rng.random() < US_LESION_SEEN:
        t0, r0 = rng.uniform(0.25, 0.75), rng.uniform(0.38, 0.5)
        cx, cy = to_px(t0, r0)
        theta = rng.uniform(-0.25, 0.25)
        echo = _draw_hypoechoic_mass(echo, x, y, cx, cy, les["ax"], les["ay"], theta,
                                     les["harmonics"], rng, sc)
        # posterior acoustic shadow or enhancement, in the column below the mass
        below = (r - r0) * geo["span"] - 0.6 * les["ay"]
        beam_off = (t - t0) * t_px  # lateral pixels from the mass's beam line
        post = expit((les["ax"] * 0.9 - np.abs(beam_off)) / (1.5 * sc)) * expit(below / (2 * sc))
        post *= np.exp(-np.clip(below, 0, None) / (0.5 * size))
        change = -rng.uniform(0.45, 0.65) if les["shadow"] else rng.uniform(0.35, 0.6)
        echo = echo * (1 + change * post)
        lesion = (cx, cy, (les["ax"] + les["ay"]) / 2)
    echo = echo * np.exp(-rng.uniform(0.5, 1.2) * r) * (1 + rng.uniform(0.2, 0.8) * r)
    z = (gaussian_filter(rng.standard_normal(t.shape), (0.7 * sc, 1.4 * sc))
         + 1j * gaussian_filter(rng.standard_normal(t.shape), (0.7 * sc, 1.4 * sc)))
    speckle = np.abs(z) / np.abs(z).mean()  # Rayleigh-distributed, mean 1
    dyn = rng.uniform(20, 60)
    img = np.log1p(dyn * echo * speckle) / np.log1p(dyn)
    img = _window(img, scan, rng, (0.0, 0.08), (0.4, 0.5)) * scan
    _draw_scanner_ui(img, rng, geo, size)
    return _to_uint8(img), lesion


# ----------------------------------------------------------------------------- cohort
def generate_cohort(out_dir: str | Path, cfg: SynthConfig | None = None,
                    progress: bool = False) -> list[ImageRecord]:
    """Writes images + out_dir/manifest.csv + out_dir/lesions.csv; returns the records.

    ``cfg`` defaults to ``SynthConfig()``. Records carry absolute paths.
    """
    cfg = cfg or SynthConfig()
    out = Path(out_dir).resolve()
    size, n = cfg.image_size, cfg.n_patients
    labels = np.repeat(np.arange(3), _class_counts(n, cfg.class_fractions))
    np.random.default_rng(np.random.SeedSequence(cfg.seed)).shuffle(labels)
    width = max(4, len(str(n)))
    records: list[ImageRecord] = []
    rows: list[dict] = []

    def save(img, p, pid, name, modality, lesion, view=View.NONE, kind=Kind.NONE):
        path = out / "images" / pid / f"{pid}_{name}.png"
        Image.fromarray(img).save(path)
        records.append(ImageRecord(pid, p.side, modality, str(path), view, kind, p.label))
        cx, cy, rad = (f"{v:.1f}" for v in lesion) if lesion else ("", "", "")
        rows.append(dict(path=path.relative_to(out).as_posix(), patient_id=pid,
                         modality=modality.value, lesion=int(lesion is not None),
                         cx=cx, cy=cy, radius=rad))

    for i, li in enumerate(labels):
        rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(i,)))
        pid = f"S{i + 1:0{width}d}"
        (out / "images" / pid).mkdir(parents=True, exist_ok=True)
        for stale in (out / "images" / pid).glob(f"{pid}_*.png"):  # from an earlier run
            stale.unlink()
        p = _draw_patient(rng, LABELS[li], size)
        for view in (View.CC, View.MLO):
            for kind in (Kind.STANDARD, Kind.SYNTHESIZED):
                img, lesion = _render_mammogram(p, view, kind, size, rng)
                if p.side is Side.RIGHT:  # chest wall at the right edge
                    img = np.ascontiguousarray(img[:, ::-1])
                    lesion = lesion and (size - 1 - lesion[0], *lesion[1:])
                save(img, p, pid, f"MG_{view.value}_{kind.value}", Modality.MG, lesion,
                     view, kind)
        for j in range(rng.integers(cfg.us_per_patient[0], cfg.us_per_patient[1] + 1)):
            img, lesion = _render_ultrasound(p, size, rng)
            save(img, p, pid, f"US_{j + 1}", Modality.US, lesion)
        if progress and ((i + 1) % 50 == 0 or i + 1 == n):
            print(f"synthetic cohort: {i + 1}/{n} patients", file=sys.stderr)

    write_manifest(records, out / "manifest.csv")
    with open(out / "lesions.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=LESION_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return records
