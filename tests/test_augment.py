"""Augmentation: the paper's flip + rotation unchanged by the optional acquisition-style steps,
each of which changes the image, keeps its shape and range, and is reproducible from its seed."""

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from breastfusion.config import TrainConfig
from breastfusion.training.augment import Augment


def _image():
    return torch.from_numpy(np.random.default_rng(1).random((1, 40, 48)).astype(np.float32))


def test_paper_augmentation_is_flip_then_rotation():
    img = _image()
    out = Augment(hflip_p=1.0, rotation_deg=10.0)(img, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    rng.random()
    angle = float(rng.uniform(-10, 10))
    expected = TF.rotate(torch.flip(img, dims=[-1]), angle, interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)
    assert torch.equal(out, expected)
    assert Augment().key() == {"hflip_p": 0.5, "rotation_deg": 15.0}  # cache keys of old runs unchanged


@pytest.mark.parametrize("field", ["zoom", "gain", "gamma", "speckle"])
def test_each_acquisition_step_changes_the_image_reproducibly(field):
    img = _image()
    plain = Augment(hflip_p=0.0, rotation_deg=0.0)
    aug = Augment(hflip_p=0.0, rotation_deg=0.0, **{field: 0.3})
    assert torch.equal(plain(img, np.random.default_rng(3)), img)
    a, b = aug(img, np.random.default_rng(3)), aug(img, np.random.default_rng(3))
    assert torch.equal(a, b) and a.shape == img.shape
    assert not torch.allclose(a, img, atol=1e-3)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert field in aug.key()


def test_train_config_reaches_the_augmentation():
    t = TrainConfig(aug_zoom=0.2, aug_gain=0.1, aug_gamma=0.3, aug_speckle=0.05)
    assert Augment.of(t) == Augment(0.5, 15.0, 0.2, 0.1, 0.3, 0.05)
