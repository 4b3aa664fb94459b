"""Train-time augmentation (paper: random horizontal flip and random rotation).

Every random draw comes from a numpy Generator that the caller seeds, so a
run is reproducible on CPU and a cached augmented copy is the same each time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class Augment:
    hflip_p: float = 0.5
    rotation_deg: float = 15.0

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """image (C, H, W) -> augmented copy, same shape."""
        if rng.random() < self.hflip_p:
            image = torch.flip(image, dims=[-1])
        if self.rotation_deg:
            angle = float(rng.uniform(-self.rotation_deg, self.rotation_deg))
            image = TF.rotate(image, angle, interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)
        return image

    def key(self) -> dict:
        return {"hflip_p": self.hflip_p, "rotation_deg": self.rotation_deg}
