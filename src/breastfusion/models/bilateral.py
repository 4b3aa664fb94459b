"""The bilateral MG branch input (our extension; `model.bilateral`).

A radiologist reads a mammogram against the same view of the other breast: tissue,
density and (on contrast images) background enhancement are roughly symmetric
between a woman's breasts, a lesion is not. The paper's MG branch sees one breast.
A bilateral branch gets each view's features and their difference to the same view
of the other breast: (B, 2V, D) features, the breast's own V slots first and then
the same slots of the other breast (`config.ModelConfig.slots`), become (B, V, 2D)
= [own, own - other], with the difference zero where the other breast lacks that
view. The view MLP, view attention and embedding then run as in the paper, on the
breast's own views.

On CDD-CESM a logistic regression on frozen features gained 2-4 points of
test-split macro AUC from this difference (docs/results/search.md, "Probe: the
other breast").
"""

from __future__ import annotations

import torch


def bilateral_views(feats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2V, D) features and (B, 2V) mask, own slots first -> (B, V, 2D) [own, own - other]
    and the (B, V) mask of the own views."""
    v2 = feats.shape[1]
    if v2 % 2:
        raise ValueError(f"a bilateral MG branch takes an even number of view slots, got {v2}")
    v = v2 // 2
    mask = mask.to(torch.bool)
    own, other = feats[:, :v], feats[:, v:]
    both = (mask[:, :v] & mask[:, v:]).unsqueeze(-1)
    diff = torch.where(both, own - other, torch.zeros_like(own))
    return torch.cat([own, diff], dim=-1), mask[:, :v]
