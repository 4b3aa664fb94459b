"""Datasets of instances: images (fine-tune mode) or cached backbone features.

A batch is a dict: "mg" (B, V, 1, S, S) + "mg_mask" (B, V) for MG models,
"us" (B, 1, S, S) for US models, "label" (B,), "index" (B,). The feature
variant holds "mg_feat" (B, V, D) and "us_feat" (B, D) instead of images; the
activation variant (partial mode) "mg_act" (B, V, C, H, W) and "us_act"
(B, C, H, W), the activation maps of the backbone's frozen stages.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..inference.batches import common_item, image_item
from ..inference.instances import Instance
from ..preprocess.pipeline import ImageSource
from .augment import Augment


def item_rng(seed: int, epoch: int, index: int, salt: str = "") -> np.random.Generator:
    """A generator that depends only on (seed, epoch, item, salt): order-independent."""
    return np.random.default_rng([seed, epoch, index, zlib.crc32(salt.encode())])


class _InstanceDataset(Dataset):
    def __init__(self, instances: Sequence[Instance], train: bool, seed: int = 0):
        self.instances = list(instances)
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.uses_mg = any(inst.mg for inst in self.instances)
        self.uses_us = any(inst.us is not None for inst in self.instances)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.instances)

    def _common(self, index: int) -> dict[str, torch.Tensor]:
        return common_item(self.instances[index], index)


class ImageInstances(_InstanceDataset):
    """Loads (preprocessed, from the cache) and in training augments every image of an instance."""

    def __init__(self, instances: Sequence[Instance], source: ImageSource, train: bool,
                 augment: Augment | None = None, seed: int = 0):
        super().__init__(instances, train, seed)
        self.source = source
        self.augment = augment if train else None

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = item_rng(self.seed, self.epoch, index)
        return image_item(self.instances[index], self.source, index, self.augment, rng)


class FeatureInstances(_InstanceDataset):
    """Serves cached backbone features ("*_feat") or frozen-stage activations ("*_act",
    `kind="act"`); in training a random augmented copy per image."""

    def __init__(self, instances: Sequence[Instance], features: dict[str, np.ndarray], train: bool,
                 seed: int = 0, kind: str = "feat"):
        super().__init__(instances, train, seed)
        self.features = features
        self.kind = kind
        mg = next((r.path for i in self.instances for r in i.mg if r is not None), None)
        self.mg_shape = tuple(features[mg].shape[1:]) if mg is not None else ()

    def _feat(self, path: str | None, rng: np.random.Generator) -> torch.Tensor:
        if path is None:  # a missing MG view
            return torch.zeros(self.mg_shape)
        copies = self.features[path]
        k = int(rng.integers(len(copies))) if self.train else 0
        return torch.from_numpy(np.array(copies[k], dtype=np.float32))  # a copy of the stored row

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        inst = self.instances[index]
        rng = item_rng(self.seed, self.epoch, index)
        item = self._common(index)
        if self.uses_mg:
            item[f"mg_{self.kind}"] = torch.stack([self._feat(r.path if r else None, rng) for r in inst.mg])
        if self.uses_us:
            item[f"us_{self.kind}"] = self._feat(inst.us.path, rng)
        return item
