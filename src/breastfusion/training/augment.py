"""Train-time augmentation: the paper's random horizontal flip and random rotation, plus
optional acquisition-style changes (our choice, off by default) that a model should not learn
a scanner or a dataset from: crop / zoom, gain, gamma and multiplicative speckle.

Every random draw comes from a numpy Generator that the caller seeds, so a run is
reproducible on CPU and a cached augmented copy is the same each time. A change that is
switched off draws no random number, so the paper's flip and rotation see the same stream
whatever the other settings are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class Augment:
    hflip_p: float = 0.5
    rotation_deg: float = 15.0
    zoom: float = 0.0  # crop a random window of side (1 - u * zoom) of the image, u ~ U(0, 1), resize back
    gain: float = 0.0  # multiply intensities by a factor in [1 - gain, 1 + gain] (overall gain / TGC)
    gamma: float = 0.0  # intensities ** g with log g ~ U(-gamma, gamma) (display curve, contrast)
    speckle: float = 0.0  # multiplicative noise: x * (1 + speckle * N(0, 1)), per pixel

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """image (C, H, W) in [0, 1] -> augmented copy, same shape."""
        if self.zoom:
            image = self._crop(image, rng)
        if rng.random() < self.hflip_p:
            image = torch.flip(image, dims=[-1])
        if self.rotation_deg:
            angle = float(rng.uniform(-self.rotation_deg, self.rotation_deg))
            image = TF.rotate(image, angle, interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)
        if self.gain:
            image = image * float(rng.uniform(1 - self.gain, 1 + self.gain))
        if self.gamma:
            image = image.clamp_min(0.0) ** float(np.exp(rng.uniform(-self.gamma, self.gamma)))
        if self.speckle:
            noise = torch.from_numpy(rng.standard_normal(image.shape).astype(np.float32))
            image = image * (1 + self.speckle * noise)
        if self.gain or self.speckle:
            image = image.clamp(0.0, 1.0)
        return image

    def _crop(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        h, w = image.shape[-2:]
        scale = 1.0 - float(rng.uniform(0, self.zoom))
        ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        window = image[..., top:top + ch, left:left + cw]
        return F.interpolate(window[None], size=(h, w), mode="bilinear", align_corners=False)[0]

    def key(self) -> dict:
        key = {"hflip_p": self.hflip_p, "rotation_deg": self.rotation_deg}
        extra = {"zoom": self.zoom, "gain": self.gain, "gamma": self.gamma, "speckle": self.speckle}
        return {**key, **{k: v for k, v in extra.items() if v}}  # (keys without them stay as they were)

    @classmethod
    def of(cls, train) -> Augment:
        """The augmentation a TrainConfig asks for."""
        return cls(train.hflip_p, train.rotation_deg, train.aug_zoom, train.aug_gain, train.aug_gamma,
                   train.aug_speckle)
