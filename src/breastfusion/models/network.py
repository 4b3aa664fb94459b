"""The whole network: backbones per modality -> branches -> ArcFace -> fusion -> 3 logits.

`FusionHead` is everything after the backbones; it is what cached-feature
training trains. `BreastFusionNet` puts the backbones in front of the same
head, for fine-tuning and for inference on images. Both modes therefore share
one model definition.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..choices import Fusion, Head
from ..config import ModelConfig
from ..vocab import N_CLASSES, Modality
from .arcface import ArcMarginHead
from .attention import l2_normalize
from .backbones import Backbone, build_backbone, pooled_dim
from .bilateral import bilateral_views
from .branches import MGBranch, USBranch, mlp
from .fusion import ConcatFusion, CrossAttentionFusion


@dataclass
class NetOutput:
    logits: torch.Tensor  # (B, 3)
    embeddings: dict[Modality, torch.Tensor] = field(default_factory=dict)  # (B, 256) per branch
    arc_logits: dict[Modality, torch.Tensor] = field(default_factory=dict)  # ArcFace head, per branch
    view_weights: torch.Tensor | None = None  # (B, V) MG view attention


class PlainFusionHead(nn.Module):
    """Habib et al. 2020's head: backbone features of each modality (MG views averaged over
    the present ones) concatenated, one linear layer, 3 logits; no attention, no ArcFace.
    A bilateral model averages each view's [own, own - other] (models/bilateral.py)."""

    def __init__(self, cfg: ModelConfig, feat_dims: dict[Modality, int] | int):
        super().__init__()
        self.cfg = cfg
        self.modalities = cfg.modality_set
        feat_dims = per_modality(cfg, feat_dims)
        if Modality.MG in feat_dims and cfg.bilateral:
            feat_dims[Modality.MG] *= 2
        self.classifier = nn.Linear(sum(feat_dims[m] for m in self.modalities), N_CLASSES)

    def forward(self, mg_feat: torch.Tensor | None = None, mg_mask: torch.Tensor | None = None,
                us_feat: torch.Tensor | None = None, target: torch.Tensor | None = None) -> NetOutput:
        parts = []
        if Modality.MG in self.modalities:
            if self.cfg.bilateral:
                mg_feat, mg_mask = bilateral_views(mg_feat, mg_mask)
            weights = mg_mask.to(mg_feat.dtype)
            weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
            mg_feat = torch.where(mg_mask.unsqueeze(-1).to(torch.bool), mg_feat, torch.zeros_like(mg_feat))
            parts.append(torch.einsum("bv,bvd->bd", weights, mg_feat))
        if Modality.US in self.modalities:
            parts.append(us_feat)
        return NetOutput(logits=self.classifier(torch.cat(parts, dim=1)))


def build_head(cfg: ModelConfig, feat_dims: dict[Modality, int] | int) -> nn.Module:
    """The head for backbone features of these dimensions (one per modality, or one for all)."""
    return PlainFusionHead(cfg, feat_dims) if cfg.head == Head.PLAIN else FusionHead(cfg, feat_dims)


def feature_dims(cfg: ModelConfig) -> dict[Modality, int]:
    """Each modality's pooled backbone feature dimension, without building a backbone."""
    return {m: pooled_dim(bb) for m, bb in cfg.backbones().items()}


def per_modality(cfg: ModelConfig, feat_dims: dict[Modality, int] | int) -> dict[Modality, int]:
    return {m: feat_dims for m in cfg.modality_set} if isinstance(feat_dims, int) else dict(feat_dims)


class FusionHead(nn.Module):
    def __init__(self, cfg: ModelConfig, feat_dims: dict[Modality, int] | int):
        super().__init__()
        feat_dims = per_modality(cfg, feat_dims)
        self.cfg = cfg
        self.modalities = cfg.modality_set
        slope, drop, emb = cfg.leaky_slope, cfg.dropout, cfg.embedding_dim
        self.mg = self.us = None
        if Modality.MG in self.modalities:
            self.mg = MGBranch(feat_dims[Modality.MG], cfg.branch_dims, cfg.view_attention_dim, emb, cfg.arcface,
                               slope, drop, cfg.arcface_scale, cfg.bilateral)
        if Modality.US in self.modalities:
            self.us = USBranch(feat_dims[Modality.US], cfg.branch_dims, emb, cfg.arcface, slope, drop,
                               cfg.arcface_scale)
        self.arc_heads = nn.ModuleDict()
        if cfg.arcface:
            for m in self.modalities:
                self.arc_heads[m.value] = ArcMarginHead(emb, N_CLASSES, cfg.arcface_scale, cfg.arcface_margin)
        if cfg.multimodal:
            if cfg.fusion == Fusion.CONCAT:
                self.classifier = ConcatFusion(emb, cfg.fusion_dims, slope, drop)
            else:
                self.classifier = CrossAttentionFusion(emb, cfg.attention_tokens, cfg.attention_heads,
                                                       cfg.fusion_dims, slope, drop)
        else:
            self.classifier = mlp([emb, *cfg.head_dims, N_CLASSES], slope, drop, last_activation=False)

    def forward(self, mg_feat: torch.Tensor | None = None, mg_mask: torch.Tensor | None = None,
                us_feat: torch.Tensor | None = None, target: torch.Tensor | None = None,
                mg_branch: tuple[torch.Tensor, torch.Tensor] | None = None) -> NetOutput:
        """`mg_branch`: the MG branch's (embedding, view weights), already computed (prediction
        computes them once per patient and reuses them for each of its US images)."""
        out = NetOutput(logits=torch.empty(0))
        if self.mg is not None:
            if mg_branch is not None:
                out.embeddings[Modality.MG], out.view_weights = mg_branch
            elif mg_feat is None or mg_mask is None:
                raise ValueError("this model needs MG features and a view mask")
            else:
                out.embeddings[Modality.MG], out.view_weights = self.mg(mg_feat, mg_mask)
        if self.us is not None:
            if us_feat is None:
                raise ValueError("this model needs US features")
            out.embeddings[Modality.US] = self.us(us_feat)
        for name, head in self.arc_heads.items():
            out.arc_logits[Modality(name)] = head(out.embeddings[Modality(name)], target)
        if self.cfg.multimodal:
            f_mg, f_us = out.embeddings[Modality.MG], out.embeddings[Modality.US]
            if self.cfg.l2_normalize:
                f_mg, f_us = l2_normalize(f_mg), l2_normalize(f_us)
            out.logits = self.classifier(f_mg, f_us)
        else:
            (only,) = out.embeddings.values()
            out.logits = self.classifier(only)
        return out


class BreastFusionNet(nn.Module):
    """Images in, logits out. MG views of a case share one backbone; US has its own.

    Partial mode feeds the activation maps of the backbones' frozen stages ("mg_act",
    "us_act") instead of images: only the later stages run (`Backbone.tail`)."""

    def __init__(self, cfg: ModelConfig, backbones: dict[Modality, Backbone] | None = None):
        super().__init__()
        self.cfg = cfg
        backbones = backbones or {m: build_backbone(bb) for m, bb in cfg.backbones().items()}
        self.mg_backbone = backbones.get(Modality.MG)
        self.us_backbone = backbones.get(Modality.US)
        self.head = build_head(cfg, {m: b.out_dim for m, b in backbones.items()})

    def backbone(self, modality: Modality) -> Backbone:
        found = self.mg_backbone if modality is Modality.MG else self.us_backbone
        if found is None:
            raise ValueError(f"this model has no {modality.value} branch")
        return found

    def encode_mg(self, images: torch.Tensor, mask: torch.Tensor, activations: bool = False) -> torch.Tensor:
        """(B, V, C, H, W) views -> (B, V, D) features; only present views go through the CNN.
        `activations`: the views are activation maps of the frozen stages (partial mode)."""
        b, v = mask.shape
        mask = mask.to(torch.bool)
        present = images[mask]
        present = self.mg_backbone.tail(present) if activations else self.mg_backbone(present)
        feats = present.new_zeros(b, v, present.shape[-1])
        feats[mask] = present
        return feats

    def encode_us(self, images: torch.Tensor, activations: bool = False) -> torch.Tensor:
        return self.us_backbone.tail(images) if activations else self.us_backbone(images)

    def forward(self, batch: dict[str, torch.Tensor], target: torch.Tensor | None = None) -> NetOutput:
        """`batch` holds images ("mg", "mg_mask", "us") or cached features ("mg_feat", "us_feat")."""
        return self.head(**features_of(batch, self.head.modalities, self), target=target)


def features_of(batch: dict[str, torch.Tensor], modalities, net: BreastFusionNet | None = None
                ) -> dict[str, torch.Tensor]:
    """The head's inputs for a batch: cached features as they are, images through the backbones,
    frozen-stage activations through the backbones' later stages."""
    out: dict[str, torch.Tensor] = {}
    if Modality.MG in modalities:
        mask = out["mg_mask"] = batch["mg_mask"]
        if "mg_feat" in batch:
            out["mg_feat"] = batch["mg_feat"]
        elif "mg_act" in batch:
            out["mg_feat"] = net.encode_mg(batch["mg_act"], mask, activations=True)
        else:
            out["mg_feat"] = net.encode_mg(batch["mg"], mask)
    if Modality.US in modalities:
        if "us_feat" in batch:
            out["us_feat"] = batch["us_feat"]
        else:
            act = "us_act" in batch
            out["us_feat"] = net.encode_us(batch["us_act" if act else "us"], activations=act)
    return out


class HeadOnly(nn.Module):
    """The head alone, fed cached features: what cached-feature training trains."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, batch: dict[str, torch.Tensor], target: torch.Tensor | None = None) -> NetOutput:
        return self.head(**features_of(batch, self.head.modalities), target=target)


def _branch_prefixes(modality: Modality) -> tuple[str, ...]:
    branch = "mg" if modality is Modality.MG else "us"
    return (f"{branch}_backbone.", f"head.{branch}.", f"head.arc_heads.{modality.value}.")


def transfer_branch(source: nn.Module, target: nn.Module, modality: Modality, freeze: bool = True) -> int:
    """Copy one modality's branch (backbone if both have one, MLP, ArcFace) from a trained
    single-modality model into a multimodal one; optionally freeze it there (parameters, and the
    backbone's BatchNorm statistics: training the fusion leaves the branch exactly as trained).
    Returns tensors copied."""
    prefixes = _branch_prefixes(modality)
    src = source.state_dict()
    own = target.state_dict()
    copied = {k: src[k] for k in own if k.startswith(prefixes) and k in src}
    if not copied:
        raise ValueError(f"no {modality.value} branch weights to transfer")
    target.load_state_dict(copied, strict=False)
    if freeze:
        for name, param in target.named_parameters():
            if name.startswith(prefixes):
                param.requires_grad_(False)
        if isinstance(target, BreastFusionNet):  # its BatchNorm statistics stay the branch's too
            target.backbone(modality).hold()
    return len(copied)
