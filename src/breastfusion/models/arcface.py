"""ArcFace: additive angular margin (Deng et al. 2019), as a layer and as a loss head.

The paper applies ArcFace as a *layer* on each modality's 512-d feature,
producing a 256-d "discriminative" embedding before fusion, but does not say
how a 512 -> 256 layer carries a margin. Our reading (method.md, "our choice"):

* `ArcFaceEmbedding`: a cosine layer. With L2-normalised feature x and
  L2-normalised rows w_k of W (256 x 512), output k is s * cos(theta_k) =
  s * w_k . x: the cosines to 256 learned directions, times the ArcFace scale
  s (the same s as in the ArcFace softmax). Raw cosines of a 512-d vector to
  random directions are ~0.05 in size, which leaves the FC layers after them
  (and the fusion) with near-constant inputs; scaling by s puts them at O(1).
* `ArcMarginHead`: during training an auxiliary head with one centre per class
  on that 256-d embedding gives cos(theta_i); the true class's cosine is
  replaced by cos(theta_y + m) and the scaled logits s * cos(.) feed a
  cross-entropy term (the ArcFace loss) added to the main loss. At inference
  the head returns plain cosines (no margin) and is only a diagnostic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-7


class ArcFaceEmbedding(nn.Module):
    """Cosine layer: normalised feature times normalised weight -> cosines in [-1, 1]."""

    def __init__(self, in_dim: int, out_dim: int, scale: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.xavier_uniform_(self.weight)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))


class ArcMarginHead(nn.Module):
    """Class centres with an additive angular margin on the target class in training."""

    def __init__(self, in_dim: int, n_classes: int, scale: float = 30.0, margin: float = 0.5):
        super().__init__()
        self.centres = nn.Parameter(torch.empty(n_classes, in_dim))
        nn.init.xavier_uniform_(self.centres)
        self.scale = float(scale)
        self.margin = float(margin)
        self.cos_m = math.cos(margin)
        self.sin_m = math.sin(margin)
        # insightface: beyond theta = pi - m, cos(theta + m) stops decreasing; use a
        # linear fallback cos(theta) - sin(pi - m) * m that keeps it monotonic.
        self.threshold = math.cos(math.pi - margin)
        self.fallback = math.sin(math.pi - margin) * margin

    def cosines(self, emb: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(emb, dim=-1), F.normalize(self.centres, dim=-1))

    def margin_cosines(self, cos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """cos(theta_y + m) at the target column, cos(theta_j) elsewhere; finite at cos = +-1."""
        cos = cos.clamp(-1.0, 1.0)
        sin = torch.sqrt((1.0 - cos * cos).clamp(min=_EPS))
        phi = cos * self.cos_m - sin * self.sin_m
        phi = torch.where(cos > self.threshold, phi, cos - self.fallback)
        onehot = F.one_hot(target, cos.shape[-1]).to(torch.bool)
        return torch.where(onehot, phi, cos)

    def forward(self, emb: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled logits: with margin when training and a target is given, plain otherwise."""
        cos = self.cosines(emb)
        if self.training and target is not None:
            cos = self.margin_cosines(cos, target)
        return self.scale * cos
