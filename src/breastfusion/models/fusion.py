"""Multimodal fusion of the MG and US embeddings into three logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..vocab import N_CLASSES
from .attention import CrossModalAttention
from .branches import mlp


class ConcatFusion(nn.Module):
    """[f_MG ; f_US] (2 x 256) -> FC layers with LeakyReLU -> 3 (the paper's best model)."""

    def __init__(self, emb_dim: int, hidden: Sequence[int], slope: float, dropout: float = 0.0):
        super().__init__()
        self.classifier = mlp([2 * emb_dim, *hidden, N_CLASSES], slope, dropout, last_activation=False)

    def forward(self, f_mg: torch.Tensor, f_us: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.cat([f_mg, f_us], dim=1))


class CrossAttentionFusion(nn.Module):
    """Cross-attention in both directions, concatenated -> FC layers -> 3."""

    def __init__(self, emb_dim: int, tokens: int, heads: int, hidden: Sequence[int], slope: float,
                 dropout: float = 0.0):
        super().__init__()
        self.attention = CrossModalAttention(emb_dim, tokens, heads)
        self.classifier = mlp([self.attention.out_dim, *hidden, N_CLASSES], slope, dropout,
                              last_activation=False)

    def forward(self, f_mg: torch.Tensor, f_us: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.attention(f_mg, f_us))
