"""Attention modules: pooling over MG views, and cross-modal attention for fusion."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ViewAttentionPool(nn.Module):
    """Weights the MG view vectors by a learned score and sums them.

    score_v = w^T tanh(V h_v) (attention pooling, Ilse et al. 2018); missing
    views (mask False) get weight exactly 0 and their vectors are zeroed, so
    nothing about a masked view reaches the output. A case with no view at all
    pools to the zero vector.
    """

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, views: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """views (B, V, D), mask (B, V) bool -> pooled (B, D), weights (B, V)."""
        mask = mask.to(torch.bool)
        views = torch.where(mask.unsqueeze(-1), views, torch.zeros_like(views))
        scores = self.score(views).squeeze(-1).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        weights = torch.where(mask, weights, torch.zeros_like(weights))  # all-missing rows: 0, not NaN
        return torch.einsum("bv,bvd->bd", weights, views), weights


class SpatialAttentionPool(nn.Module):
    """Global pooling of a feature map by learned attention over its cells: each cell (the
    receptive field of a tile of the image) is a view in the sense of ViewAttentionPool, scored
    and weighted by the same function. Multiple-instance learning over tiles (Ilse et al. 2018),
    for findings that cover a few cells of a large image. At initialisation the scores are
    nearly equal: it starts as average pooling.

    `cell` > 1: a cell is the average of k x k map positions (a side not divisible by k keeps its
    last, partial cell), so attention weighs fewer, larger tiles."""

    def __init__(self, dim: int, hidden: int = 128, cell: int = 1):
        super().__init__()
        self.cells = ViewAttentionPool(dim, hidden)
        self.cell = int(cell)

    def _grid(self, feature_map: torch.Tensor) -> torch.Tensor:
        if self.cell > 1:
            return F.avg_pool2d(feature_map, self.cell, ceil_mode=True)
        return feature_map

    def _attend(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cells = grid.flatten(2).transpose(1, 2)  # (B, h*w, C)
        mask = torch.ones(cells.shape[:2], dtype=torch.bool, device=cells.device)
        return self.cells(cells, mask)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C)."""
        return self._attend(self._grid(feature_map))[0]

    def weights(self, feature_map: torch.Tensor) -> torch.Tensor:
        """The attention each cell gets, (B, h, w) with h = ceil(H / cell), summing to 1 per image."""
        grid = self._grid(feature_map)
        return self._attend(grid)[1].view(grid.shape[0], *grid.shape[2:])


class CrossModalAttention(nn.Module):
    """Each modality queries the other (method.md, "Fusion"):

    f^_US = Att(Q_MG, K_US, V_US), f^_MG = Att(Q_US, K_MG, V_MG), with
    multi-head Att(Q, K, V) = softmax(Q K^T / sqrt(C)) V.

    Our choice: each 256-d embedding is read as `tokens` tokens of
    256 / tokens dims (plus a learned position code), so the softmax runs over
    several keys rather than a single vector (for which it would be trivially 1).
    Output: [f^_US ; f^_MG] flattened, 2 x 256 dims.
    """

    def __init__(self, dim: int = 256, tokens: int = 8, heads: int = 8):
        super().__init__()
        self.tokens = tokens
        self.token_dim = dim // tokens
        self.pos_mg = nn.Parameter(torch.zeros(1, tokens, self.token_dim))
        self.pos_us = nn.Parameter(torch.zeros(1, tokens, self.token_dim))
        self.att_us = nn.MultiheadAttention(self.token_dim, heads, batch_first=True)
        self.att_mg = nn.MultiheadAttention(self.token_dim, heads, batch_first=True)
        self.out_dim = 2 * dim

    def _tokens(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.tokens, self.token_dim) + pos

    def forward(self, f_mg: torch.Tensor, f_us: torch.Tensor) -> torch.Tensor:
        mg = self._tokens(f_mg, self.pos_mg)
        us = self._tokens(f_us, self.pos_us)
        us_hat, _ = self.att_us(query=mg, key=us, value=us, need_weights=False)
        mg_hat, _ = self.att_mg(query=us, key=mg, value=mg, need_weights=False)
        return torch.cat([us_hat.flatten(1), mg_hat.flatten(1)], dim=1)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
