"""Single-modality branches: backbone features -> 256-d embedding.

MG branch (method.md): per view FC 2048->1024, LeakyReLU, FC 1024->512,
LeakyReLU (shared over views) -> attention across views -> ArcFace layer
512->256. US branch: FC 2048->1024->512 (LeakyReLU) -> ArcFace 512->256.
With `arcface=False` (the paper's "without ArcFace" ablation) the ArcFace
layer is a plain FC 512->256 with LeakyReLU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .arcface import ArcFaceEmbedding
from .attention import ViewAttentionPool
from .bilateral import bilateral_views


def mlp(dims: Sequence[int], slope: float, dropout: float = 0.0, last_activation: bool = True) -> nn.Sequential:
    """FC layers dims[0] -> dims[1] -> ... with LeakyReLU between (and after, if asked).

    Layers followed by a LeakyReLU get He initialisation for that slope (He et al. 2015),
    which keeps the signal's scale through the depth of the branch and fusion MLPs.
    PyTorch's default initialisation shrinks it by about 2.4x per layer: through the
    paper's 6-7 layers the logits of a model without the (rescaling) ArcFace layer
    started near zero and SGD left its training loss at ln 3 (our finding, see
    docs/results/public.md)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        linear = nn.Linear(a, b)
        layers.append(linear)
        if i < len(dims) - 2 or last_activation:
            he_init(linear, slope)
            layers.append(nn.LeakyReLU(slope))
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def he_init(linear: nn.Linear, slope: float) -> nn.Linear:
    nn.init.kaiming_normal_(linear.weight, a=slope, nonlinearity="leaky_relu")
    nn.init.zeros_(linear.bias)
    return linear


def embedding_layer(in_dim: int, out_dim: int, arcface: bool, slope: float, scale: float = 1.0) -> nn.Module:
    if arcface:
        return ArcFaceEmbedding(in_dim, out_dim, scale)
    return nn.Sequential(he_init(nn.Linear(in_dim, out_dim), slope), nn.LeakyReLU(slope))


class MGBranch(nn.Module):
    """`bilateral`: the views come with the same views of the other breast (models/bilateral.py)."""

    def __init__(self, feat_dim: int, dims: Sequence[int], attention_dim: int, emb_dim: int,
                 arcface: bool, slope: float, dropout: float = 0.0, scale: float = 1.0,
                 bilateral: bool = False):
        super().__init__()
        self.bilateral = bilateral
        self.view_mlp = mlp([feat_dim * (2 if bilateral else 1), *dims], slope, dropout)
        self.pool = ViewAttentionPool(dims[-1], attention_dim)
        self.embed = embedding_layer(dims[-1], emb_dim, arcface, slope, scale)

    def forward(self, view_feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, V, D) features and (B, V) mask -> (B, emb) embedding and (B, V) view weights
        (bilateral: (B, 2V, D) and (B, 2V) in, weights of the breast's own V views out)."""
        if self.bilateral:
            view_feats, mask = bilateral_views(view_feats, mask)
        pooled, weights = self.pool(self.view_mlp(view_feats), mask)
        return self.embed(pooled), weights


class USBranch(nn.Module):
    def __init__(self, feat_dim: int, dims: Sequence[int], emb_dim: int, arcface: bool,
                 slope: float, dropout: float = 0.0, scale: float = 1.0):
        super().__init__()
        self.mlp = mlp([feat_dim, *dims], slope, dropout)
        self.embed = embedding_layer(dims[-1], emb_dim, arcface, slope, scale)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.embed(self.mlp(feats))
