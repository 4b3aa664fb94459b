"""Localisation scores and the mapping of annotations into the model's input space."""

import numpy as np

from breastfusion.explain.localisation import (
    centre_prior,
    circle_mask,
    energy_inside,
    pointing_hit,
    score,
    summarize,
    to_model_space,
)
from breastfusion.preprocess.mammo import CropInfo


def test_annotation_follows_crop_flip_padding_and_resize():
    mask = np.zeros((10, 20), dtype=bool)
    mask[3, 5] = mask[3, 6] = mask[4, 5] = mask[4, 6] = True  # a 2x2 lesion
    info = CropInfo((10, 20), (2, 4, 8, 16), flipped=True)  # crop rows 2-7, cols 4-15, then mirror
    out = to_model_space(mask, info, 24)
    # crop: rows 1-2, cols 1-2 of a 6x12 image; mirror: cols 9-10; pad to 12x12: rows +3 -> 4-5;
    # resize x2: rows 8-11, cols 18-21
    rows, cols = np.nonzero(out)
    assert out.shape == (24, 24)
    assert 8 <= rows.min() and rows.max() <= 11 and 18 <= cols.min() and cols.max() <= 21
    unflipped = to_model_space(mask, CropInfo((10, 20), (2, 4, 8, 16)), 24)
    assert np.nonzero(unflipped)[1].max() < 6  # without the mirror it stays on the left


def test_pointing_energy_and_centre_prior():
    lesion = circle_mask((32, 32), (8, 8), 4)
    heat = np.zeros((32, 32))
    heat[8, 8] = 1.0
    assert pointing_hit(heat, lesion) and energy_inside(heat, lesion) == 1.0
    heat[30, 30] = 3.0
    assert not pointing_hit(heat, lesion) and energy_inside(heat, lesion) == 0.25
    prior = centre_prior(32)
    assert prior.max() == prior[15:17, 15:17].max() and prior[0, 0] < 0.05
    assert np.isnan(energy_inside(np.zeros((32, 32)), lesion))
    s = score("a.png", "benign", heat, lesion)
    assert not s.hit and not s.prior_hit and 0 < s.lesion_fraction < 0.1
    rows = summarize([s, score("b.png", "malignant", prior, circle_mask((32, 32), (16, 16), 5))])
    by_class = {r["class"]: r for r in rows}
    assert by_class["all"]["n"] == 2 and by_class["malignant"]["gradcam_hit_rate"] == 1.0
