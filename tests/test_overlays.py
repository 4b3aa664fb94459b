"""Drawn marks on ultrasound images (calipers, dotted lines, text) are masked and inpainted; tissue,
even a bright thin tissue line, and the lesion are left alone (preprocess/overlays.py)."""

import numpy as np
from scipy import ndimage as ndi

from breastfusion.preprocess.overlays import inpaint, overlay_mask, remove_overlays
from breastfusion.preprocess.pipeline import Preprocessor


def _scan(seed: int = 0, size: int = 200):
    """Speckle with a dark lesion, a bright blurred tissue line, and drawn marks on top."""
    rng = np.random.default_rng(seed)
    img = ndi.gaussian_filter(rng.gamma(2.0, 0.2, (size, size)), 1.0).astype(np.float32)
    img = np.clip(img / img.max() * 0.8, 0, 1)
    yy, xx = np.mgrid[:size, :size]
    lesion = (yy - 100) ** 2 / 30 ** 2 + (xx - 90) ** 2 / 45 ** 2 <= 1
    img[lesion] *= 0.25
    tissue_line = np.zeros_like(img)
    tissue_line[150:152, 20:180] = 1.0
    tissue_line = ndi.gaussian_filter(tissue_line, 1.5)  # the beam blurs it over several pixels
    img = np.clip(img + 0.9 * tissue_line / tissue_line.max(), 0, 1)
    clean = img.copy()
    marks = np.zeros_like(img, dtype=bool)
    for cy, cx in ((100, 45), (100, 135)):  # "+" calipers at the lesion's edges
        marks[cy - 4:cy + 5, cx] = True
        marks[cy, cx - 4:cx + 5] = True
    marks[100, 50:131:4] = True  # the dotted line between them
    marks[20:27, 160:162] = True  # a letter's strokes
    marks[20:22, 160:166] = True
    img[marks] = 1.0
    return img, clean, marks, lesion, tissue_line > 0.3 * tissue_line.max()


def test_marks_are_masked_and_tissue_and_lesion_are_not():
    img, _, marks, lesion, line = _scan()
    mask = overlay_mask(img)
    assert mask[marks].mean() == 1.0
    assert mask[line].mean() < 0.01, mask[line].mean()
    assert mask[lesion & ~ndi.binary_dilation(marks, iterations=3)].mean() < 0.01
    assert mask.mean() < 0.02
    # a clean scan (no drawn marks) loses nothing
    _, clean, _, _, _ = _scan(seed=1)
    assert overlay_mask(clean).mean() < 0.001


def test_inpainting_fills_marks_with_their_surroundings():
    img, clean, marks, _, _ = _scan()
    out, share = remove_overlays(img)
    assert 0 < share < 0.02
    assert np.abs(out[marks] - clean[marks]).mean() < 0.15  # near what the tissue there was
    assert np.abs(img[marks] - clean[marks]).mean() > 0.4  # (the marks were far from it)
    untouched = ~ndi.binary_dilation(overlay_mask(img), iterations=1)
    np.testing.assert_array_equal(out[untouched], img[untouched])
    hole = np.zeros_like(img, dtype=bool)
    hole[50:90, 50:90] = True  # a hole wider than the kernel is filled too
    assert np.isfinite(inpaint(img, hole)).all()


def test_option_is_off_by_default_and_then_leaves_cache_keys_unchanged():
    default = Preprocessor()
    assert not default.us_overlays and "us_overlays" not in default.key()
    assert Preprocessor(us_overlays=True).key_hash() != default.key_hash()
