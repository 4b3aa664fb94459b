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

from dataclasses import dataclass

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

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


def _cam(wrapper: ImageToLogits, layer: nn.Module, image: torch.Tensor, target) -> np.ndarray:
    with GradCAM(model=wrapper, target_layers=[layer]) as cam:
        heat = cam(input_tensor=image, targets=[target])
    return np.asarray(heat[0], dtype=np.float32)


def explain_instance(net: BreastFusionNet, batch: dict[str, torch.Tensor], slots: list[MGSlot],
                     class_index: int | str | None = None) -> Explanation:
    """Grad-CAM of every image of ONE instance (batch of size 1, image tensors as in training).

    `class_index`: None explains the predicted class; an index that class; ABNORMAL the
    log-odds of benign-or-malignant against normal."""
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
                mg_maps[slot.name] = _cam(wrapper, layer, batch["mg"][:, v], objective)
    us_map = None
    if "us_feat" in features:
        wrapper = ImageToLogits(net, Modality.US, features)
        us_map = _cam(wrapper, net.backbone(Modality.US).cam_layer, batch["us"], objective)
    return Explanation(target, logits.numpy(), mg_maps, us_map)
