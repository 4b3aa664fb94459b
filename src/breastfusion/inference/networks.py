"""A network rebuilt from saved weights: what export, prediction and explanation load.

A fine-tuned or partial-mode fold saved its whole network; a cached-feature fold saved only
its head, whose backbones then come from the config's pretrained weights.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import ModelConfig, RunConfig
from ..errors import WeightsError
from ..models.backbones import Backbone, build_backbone
from ..models.network import BreastFusionNet
from ..vocab import Modality


def trained_net(cfg: RunConfig, state: dict[str, torch.Tensor], backbones_from_config: bool,
                backbones: dict[Modality, Backbone] | None = None) -> BreastFusionNet:
    """A network with trained weights. A cached-feature fold saved only its head: the
    backbones then come from the config's pretrained weights (`backbones_from_config`).
    `backbones` passes backbone modules to share between networks (loaded from `state` too)."""
    model_cfg = cfg.model if backbones_from_config else untrained(cfg.model)
    given = dict(backbones or {})
    for m in model_cfg.modality_set:
        if m not in given:
            given[m] = build_backbone(model_cfg.backbone_for(m))
    net = BreastFusionNet(model_cfg, given)
    own = net.state_dict()
    backbone_keys = ("mg_backbone.", "us_backbone.")
    missing = [k for k in own if k not in state and not (backbones_from_config and k.startswith(backbone_keys))]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise WeightsError(f"weights do not fit the configured network ({len(missing)} missing, "
                           f"{len(unexpected)} unexpected tensors; first: {first})")
    try:
        net.load_state_dict(state, strict=not backbones_from_config)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "size mismatch" in ln or "Missing" in ln or "Unexpected" in ln), lines[0])
        raise WeightsError(f"weights do not fit the configured network ({detail[:200]})") from None
    return net.eval()


def untrained(model_cfg: ModelConfig) -> ModelConfig:
    """The model config with every backbone's pretrained weights replaced by "none" (the
    weights come from a saved state instead)."""
    def none(bb):
        return None if bb is None else dataclasses.replace(bb, weights="none")
    return dataclasses.replace(model_cfg, backbone=none(model_cfg.backbone), mg_backbone=none(model_cfg.mg_backbone),
                               us_backbone=none(model_cfg.us_backbone))
