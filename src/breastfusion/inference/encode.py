"""Images -> backbone features: the one place that computes them, under one precision policy.

The policy, for every mode of training (`train.mode`) and every caller:

* The **frozen part** of a backbone whose output is stored on disk (all of it in cached mode,
  the stages up to `frozen` in partial mode) computes in plain fp32, whatever
  `train.precision` says: a stored feature must not depend on the machine that filled the
  cache. Partial mode stores it in `train.activation_dtype` (fp16 by default).
* The **trained part** (the whole backbone in fine-tune mode, the later stages in partial
  mode) computes at `train.precision` (autocast), as the training loop ran it; so does the head.

`stored_features` is what the feature store (training/features.py) keeps; `trained_features`
is what a trained network's head received in training for the same images, and what
prediction (predict/run.py) feeds the heads: a bundle predicts from the very features it was
trained and validated on (tests/test_precision_policy.py).
"""

from __future__ import annotations

import contextlib

import torch

from ..choices import ActivationDtype, TrainMode
from ..config import TrainConfig
from ..models.backbones import Backbone
from .runtime import autocast


def stored_features(backbone: Backbone, images: torch.Tensor, stage: str | None = None) -> torch.Tensor:
    """fp32 pooled features (`stage` None: cached mode) or the activation map after `stage`
    (partial mode), computed without autocast."""
    with torch.autocast(images.device.type, enabled=False):
        out = backbone(images) if stage is None else backbone.trunk(images, stage)
    return out.float()


def storage_dtype(activation_dtype: str) -> torch.dtype:
    """How a partial-mode store keeps activations (`train.activation_dtype`; pooled features
    are always fp32)."""
    return torch.float16 if activation_dtype == ActivationDtype.FP16 else torch.float32


def trained_part(device: torch.device, train: TrainConfig) -> contextlib.AbstractContextManager:
    """The arithmetic of everything after the stored part: the head and the trained stages."""
    return autocast(device, train.precision)


def trained_features(backbone: Backbone, images: torch.Tensor, train: TrainConfig) -> torch.Tensor:
    """The pooled features the head of a network trained with `train` received for `images`."""
    if train.mode == TrainMode.CACHED:
        return stored_features(backbone, images)
    if train.mode == TrainMode.PARTIAL:
        stage = backbone.frozen_stage
        act = stored_features(backbone, images, stage)
        act = act.to(storage_dtype(train.activation_dtype)).float()  # as stored, then as read
        with trained_part(images.device, train):
            return backbone.tail(act, stage).float()
    with trained_part(images.device, train):
        return backbone(images).float()
