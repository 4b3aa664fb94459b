"""Grad-CAM heatmaps per MG view and per US image (paper, figures 7-9).

Grad-CAM (Selvaraju et al. 2017) weights the feature maps of a convolutional
layer by the spatially averaged gradient of a class score and keeps the
positive part. breastfusion computes it with pytorch-grad-cam on each
backbone's ``cam_layer`` (ResNet: layer4; GoogLeNet: inception5b;
EfficientNet-Lite0: its last 1x1 convolution block).

The network takes several images per instance (up to four MG views and one
US image), while Grad-CAM explains a single-input model. `ImageToLogits`
therefore wraps the whole network as a function of ONE of its images, every
other input held fixed at its features: the heatmap of a view is the
gradient of the *fused* class score with respect to that view's feature maps,
which is what the paper's per-branch figures show. Hooks are released by
construction: pytorch-grad-cam's ``GradCAM`` is used as a context manager.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from scipy.ndimage import map_coordinates
from torch import nn

from ..models.efficientnet_lite import SameConv2d, same_padding
from ..models.network import BreastFusionNet
from ..vocab import MGSlot, Modality


class ImageToLogits(nn.Module):
    """The network as a function of one image of one instance: (1, 1, H, W) -> (1, 3) logits."""

    def __init__(self, net: BreastFusionNet, modality: Modality, features: dict[str, torch.Tensor],
                 view: int | None = None):
        super().__init__()
        self.net, self.modality, self.view = net, modality, view
        self.fixed = {k: v.detach() for k, v in features.items()}

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # Frozen backbones have no parameter that needs a gradient: asking for one on
        # the input makes the activations of the CAM layer part of the graph.
        image = image.detach().requires_grad_(True)
        feat = self.net.backbone(self.modality)(image)
        inputs = dict(self.fixed)
        if self.modality is Modality.MG:
            views = inputs["mg_feat"].clone()
            views[:, self.view] = feat
            inputs["mg_feat"] = views
        else:
            inputs["us_feat"] = feat
        return self.net.head(**inputs).logits


ABNORMAL = "abnormal"  # explain the evidence against "normal" (benign or malignant)


class AbnormalTarget:
    """Score = log-odds that the breast is abnormal: logsumexp(benign, malignant) - normal.

    The triage question "what makes this breast not normal" has one map for both lesion
    classes; explaining benign (or malignant) alone asks where the evidence for one lesion
    class against the other and against normal lies, which is a subtler question."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(logits[..., 1:], dim=-1) - logits[..., 0]


def _target(class_index: int | str):
    return AbnormalTarget() if class_index == ABNORMAL else ClassifierOutputTarget(int(class_index))


@dataclass
class Explanation:
    """Grad-CAM maps of one instance, each (H, W) in [0, 1] at the model's input size."""

    class_index: int | str  # a class index, or ABNORMAL
    logits: np.ndarray  # (3,)
    mg: dict[str, np.ndarray]  # MG slot name -> heatmap, present views only
    us: np.ndarray | None


@torch.no_grad()
def _features(net: BreastFusionNet, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    if net.mg_backbone is not None and Modality.MG in net.head.modalities:
        out["mg_mask"] = batch["mg_mask"]
        out["mg_feat"] = net.encode_mg(batch["mg"], batch["mg_mask"])
    if net.us_backbone is not None and Modality.US in net.head.modalities:
        out["us_feat"] = net.encode_us(batch["us"])
    return out


class _GridCAM(GradCAM):
    """pytorch-grad-cam's Grad-CAM, returned on the layer's own grid (normalised to [0, 1])
    instead of resized to the input: `upsample` places each cell where it looks."""

    def get_target_width_height(self, input_tensor: torch.Tensor) -> tuple[int, int]:
        height, width = self.activations_and_grads.activations[-1].shape[-2:]
        return int(width), int(height)


def _cam(wrapper: ImageToLogits, layer: nn.Module, image: torch.Tensor, target, align: bool = False) -> np.ndarray:
    size = tuple(image.shape[-2:])
    if not align:  # the library's own resize: cell k of n drawn at (k + 0.5) * size / n
        with GradCAM(model=wrapper, target_layers=[layer]) as cam:
            return np.asarray(cam(input_tensor=image, targets=[target])[0], dtype=np.float32)
    with _GridCAM(model=wrapper, target_layers=[layer]) as cam:
        grid = np.asarray(cam(input_tensor=image, targets=[target])[0], dtype=np.float32)
    backbone = wrapper.net.backbone(wrapper.modality)
    return upsample(grid, receptive_field_centres(backbone, layer, size))


@dataclass(frozen=True)
class CellCentres:
    """Where a layer's cells look in an input of `size` (height, width): pixel coordinates of
    the centres of its rows and of its columns, each increasing."""

    rows: np.ndarray
    cols: np.ndarray
    size: tuple[int, int]


def upsample(grid: np.ndarray, centres: CellCentres) -> np.ndarray:
    """Bilinear interpolation of a (h, w) cell grid to the input's pixels, each cell placed at
    its receptive field's centre; constant beyond the outermost centres. Maximum 1."""
    height, width = centres.size
    r = np.interp(np.arange(height), centres.rows, np.arange(len(centres.rows), dtype=float))
    c = np.interp(np.arange(width), centres.cols, np.arange(len(centres.cols), dtype=float))
    heat = map_coordinates(grid.astype(np.float64), np.meshgrid(r, c, indexing="ij"), order=1, mode="nearest")
    top = heat.max()
    return (heat / top if top > 0 else heat).astype(np.float32)


_CENTRES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def receptive_field_centres(backbone: nn.Module, layer: nn.Module, size: tuple[int, int]) -> CellCentres:
    """Pixel coordinates of the centres of the receptive fields of `layer`'s cells, for an
    input of `size`: each downsampling convolution or pooling on the way (traced with forward
    hooks) maps its output cell o to the centre of its window, stride * o - padding before +
    (kernel - 1) / 2. Parallel branches (a ResNet shortcut, Inception's towers) downsample
    alike, so only the first operation that leaves each resolution is followed.

    A plain resize draws cell k of n at (k + 0.5) * size / n, but padding shifts the grid: with
    TensorFlow's 'SAME' padding (EfficientNet) a stride-2 layer pads at the bottom/right only,
    and the last block's receptive fields are centred at 32 k + 31, 15.5 px below and right of
    the resize's positions; ResNet's symmetric padding centres them at 32 k (15.5 px up and
    left), GoogLeNet's unpadded pools at 32 k + 22. Where a trained network looks is another
    matter: the centre of mass of ImageNet EfficientNet-Lite0's effective receptive fields
    (input gradients over random images, Luo et al. 2016) lies on average 8 px below and
    4 px left of the resize's positions, with a spread of 7-12 px between cells (randomly
    initialised: at the geometric centres; bench/receptive_fields.py), and on the synthetic
    cohort the pointing game scored lower with geometric placement (docs/results/explain.md).
    So placement by geometric centre is an option (`explain_instance(align=True)`), not the
    default.
    Cached per (backbone, layer, size)."""
    key = (id(layer), tuple(size))
    cached = _CENTRES.setdefault(backbone, {})
    if key not in cached:
        cached[key] = _trace_centres(backbone, layer, (int(size[0]), int(size[1])))
    return cached[key]


def _window(module: nn.Module, in_size: tuple[int, int], axis: int) -> tuple[float, float]:
    """(stride, centre of output cell 0) of one downsampling operation along `axis`, in its
    input's cell coordinates."""
    pick = (lambda v: v if isinstance(v, int) else v[axis])
    kernel, stride = pick(module.kernel_size), pick(module.stride or module.kernel_size)
    dilation = pick(getattr(module, "dilation", 1))
    span = dilation * (kernel - 1) + 1
    if isinstance(module, SameConv2d):
        before = same_padding(in_size[axis], span, stride) // 2
    else:
        before = pick(module.padding)
    return float(stride), -before + (span - 1) / 2


def _trace_centres(backbone: nn.Module, layer: nn.Module, size: tuple[int, int]) -> CellCentres:
    calls: list[tuple[nn.Module, tuple[int, int], tuple[int, int]]] = []

    def record(module, args, out):
        calls.append((module, tuple(args[0].shape[-2:]), tuple(out.shape[-2:])))

    kinds = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
    hooks = [m.register_forward_hook(record) for m in backbone.modules() if isinstance(m, kinds)]
    grids = []
    hooks.append(layer.register_forward_hook(lambda module, args, out: grids.append(tuple(out.shape[-2:]))))
    try:
        param = next(backbone.parameters())
        with torch.no_grad():
            backbone(torch.zeros(1, 1, *size, device=param.device, dtype=param.dtype))
    finally:
        for hook in hooks:
            hook.remove()
    grid = grids[0]
    current, steps = size, []  # steps: (stride, offset) per axis, input side first
    for module, in_size, out_size in calls:
        if in_size != current or out_size == current:
            continue
        steps.append([_window(module, in_size, axis) for axis in (0, 1)])
        current = out_size
        if current == grid:
            break
    axes = []
    for axis in (0, 1):
        x = np.arange(grid[axis], dtype=float)
        for step in reversed(steps):
            stride, offset = step[axis]
            x = stride * x + offset
        axes.append(x)
    return CellCentres(axes[0], axes[1], size)


def explain_instance(net: BreastFusionNet, batch: dict[str, torch.Tensor], slots: list[MGSlot],
                     class_index: int | str | None = None, align: bool = False) -> Explanation:
    """Grad-CAM of every image of ONE instance (batch of size 1, image tensors as in training).

    `class_index`: None explains the predicted class; an index that class; ABNORMAL the
    log-odds of benign-or-malignant against normal. `align`: each cell drawn at its receptive
    field's geometric centre (`receptive_field_centres`) instead of by the library's plain
    resize (the default; see that function for why)."""
    net.eval()
    features = _features(net, batch)
    with torch.no_grad():
        logits = net.head(**features).logits[0].float()
    target = int(logits.argmax()) if class_index is None else class_index
    objective = _target(target)
    mg_maps: dict[str, np.ndarray] = {}
    if "mg_feat" in features:
        layer = net.backbone(Modality.MG).cam_layer
        present = batch["mg_mask"][0].tolist()
        for v, slot in enumerate(slots):
            if present[v]:
                wrapper = ImageToLogits(net, Modality.MG, features, view=v)
                mg_maps[slot.name] = _cam(wrapper, layer, batch["mg"][:, v], objective, align)
    us_map = None
    if "us_feat" in features:
        wrapper = ImageToLogits(net, Modality.US, features)
        us_map = _cam(wrapper, net.backbone(Modality.US).cam_layer, batch["us"], objective, align)
    return Explanation(target, logits.numpy(), mg_maps, us_map)
