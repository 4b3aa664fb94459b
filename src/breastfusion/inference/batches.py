"""An instance as tensors: what the network is fed, in training and at prediction alike.

An item is a dict: "index", "label" (-1 when unknown), and for an MG model "mg" (V, 1, S, S)
with "mg_mask" (V,) (a missing view is a zero image, masked out), for a US model "us"
(1, S, S). Training's datasets (training/data.py) build their items with `image_item`;
prediction and explanation build a batch of one with `instance_batch`. `bounded_spans` cuts
a list of images into backbone batches of a few fixed sizes only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import default_collate

from ..preprocess.pipeline import ImageSource
from ..records import ImageRecord
from ..vocab import Modality
from .instances import Instance

# (image (1, S, S), random generator) -> augmented image; training's Augment is one
Transform = Callable[[torch.Tensor, np.random.Generator], torch.Tensor]


def common_item(inst: Instance, index: int) -> dict[str, torch.Tensor]:
    """The entries every item has, whatever the network is fed (images, features, activations)."""
    item = {"index": torch.tensor(index),
            "label": torch.tensor(inst.label.index if inst.label is not None else -1)}
    if inst.mg:
        item["mg_mask"] = torch.tensor(inst.mg_mask, dtype=torch.bool)
    return item


def image_item(inst: Instance, source: ImageSource, index: int = 0, augment: Transform | None = None,
               rng: np.random.Generator | None = None) -> dict[str, torch.Tensor]:
    """An instance's preprocessed images (from the cache), augmented when `augment` is given
    (MG views first, then the US image, all from the one `rng`)."""

    def image(rec: ImageRecord | None) -> torch.Tensor:
        if rec is None:  # a missing MG view
            size = source.size(Modality.MG)
            return torch.zeros(1, size, size)
        img = torch.from_numpy(source.get(rec.path, rec.modality, rec.side)).unsqueeze(0)
        return augment(img, rng) if augment is not None else img

    item = common_item(inst, index)
    if inst.mg:
        item["mg"] = torch.stack([image(r) for r in inst.mg])
    if inst.us is not None:
        item["us"] = image(inst.us)
    return item


def instance_batch(inst: Instance, source: ImageSource) -> dict[str, torch.Tensor]:
    """One instance's images as a batch of one: exactly what fine-tune training feeds."""
    return default_collate([image_item(inst, source)])


def bounded_spans(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of batches covering n items: full batches of `batch_size`, then the rest in
    powers of two, largest first (45 at 32: 32, 8, 4, 1). The backbones thus only ever see
    batch sizes from {batch_size, 1, 2, 4, ...}: oneDNN (PyTorch's CPU convolutions) and ONNX
    Runtime keep per-shape state (primitives, memory plans), which grew with every new remainder
    size over a long `predict` batch (peak RSS 1.26x from 200 to 2,000 patients; 1.04x with
    bounded sizes, bench/predict_batch.py). No padding: every image is computed once, exactly."""
    spans, start = [], 0
    while n - start >= batch_size:
        spans.append((start, start + batch_size))
        start += batch_size
    size = 1 << max(0, (batch_size - 1).bit_length())
    while start < n:
        while size > n - start:
            size >>= 1
        spans.append((start, start + size))
        start += size
    return spans
