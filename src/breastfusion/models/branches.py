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


def mlp(dims: Sequence[int], slope: float, dropout: float = 0.0, last_activation: bool = True) -> nn.Sequential:
    """FC layers dims[0] -> dims[1] -> ... with LeakyReLU between (and after, if asked)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2 or last_activation:
            layers.append(nn.LeakyReLU(slope))
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def embedding_layer(in_dim: int, out_dim: int, arcface: bool, slope: float, scale: float = 1.0) -> nn.Module:
    if arcface:
        return ArcFaceEmbedding(in_dim, out_dim, scale)
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.LeakyReLU(slope))


class MGBranch(nn.Module):
    def __init__(self, feat_dim: int, dims: Sequence[int], attention_dim: int, emb_dim: int,
                 arcface: bool, slope: float, dropout: float = 0.0, scale: float = 1.0):
        super().__init__()
        self.view_mlp = mlp([feat_dim, *dims], slope, dropout)
        self.pool = ViewAttentionPool(dims[-1], attention_dim)
        self.embed = embedding_layer(dims[-1], emb_dim, arcface, slope, scale)

    def forward(self, view_feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, V, D) features and (B, V) mask -> (B, emb) embedding and (B, V) view weights."""
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
