"""Where Grad-CAM's cells look: geometric receptive-field centres against the centre of mass of
the effective receptive fields (Luo et al. 2016), for EfficientNet-Lite0's last block.

Usage: python bench/receptive_fields.py [--size 448] [--images 8]

For the inner 4 x 4 cells of the last block at `--size` px (large enough that their fields
are not cut by the border), the effective receptive field of a cell is the absolute input
gradient of its summed activations over `--images` random images; its centre of mass is
compared with the geometric centre (gradcam.receptive_field_centres) and with where the
library's plain resize draws the cell. Offsets are in pixels, down and right, relative to the
resize position; ImageNet weights and random initial weights. Writes a section of
docs/results/explain.md.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import ROOT, record

from breastfusion.config import BackboneConfig
from breastfusion.explain.gradcam import receptive_field_centres
from breastfusion.models.backbones import build_backbone


def effective_centres(bb, size: int, images: int, cells: range) -> np.ndarray:
    """(len(cells)^2, 2) centres of mass (row, col) of the cells' effective receptive fields."""
    grabbed = {}
    hook = bb.cam_layer.register_forward_hook(lambda m, a, out: grabbed.__setitem__("map", out))
    torch.manual_seed(0)
    x = torch.rand(images, 1, size, size, requires_grad=True)
    bb.eval()
    bb(x)
    hook.remove()
    coords = np.arange(size)
    out = []
    for cy in cells:
        for cx in cells:
            (grad,) = torch.autograd.grad(grabbed["map"][:, :, cy, cx].sum(), x, retain_graph=True)
            w = grad.abs().sum(dim=(0, 1)).double().numpy()
            out.append(((w.sum(1) * coords).sum() / w.sum(), (w.sum(0) * coords).sum() / w.sum()))
    return np.array(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--images", type=int, default=8)
    args = ap.parse_args()
    figures, lines = {}, ["| weights | cells | geometric centre - resize (down, right) px | effective centre of mass - "
                          "resize, mean (down, right) px | spread between cells (sd) px |", "|---|---|---|---|---|"]
    for weights in ("imagenet", "none"):
        bb = build_backbone(BackboneConfig(name="efficientnet_lite0", weights=weights, image_size=args.size))
        geo = receptive_field_centres(bb, bb.cam_layer, (args.size, args.size))
        n = len(geo.rows)
        cells = range(n // 2 - 2, n // 2 + 2)
        resize = (np.arange(n) + 0.5) * args.size / n - 0.5
        eff = effective_centres(bb, args.size, args.images, cells)
        at = np.array([(resize[cy], resize[cx]) for cy in cells for cx in cells])
        geometric = np.array([(geo.rows[cy], geo.cols[cx]) for cy in cells for cx in cells]) - at
        offset = eff - at
        figures[weights] = {"geometric_minus_resize": geometric.mean(0).tolist(),
                            "effective_minus_resize_mean": offset.mean(0).tolist(),
                            "effective_minus_resize_sd": offset.std(0).tolist(), "cells": list(cells)}
        g, m, sd = geometric.mean(0), offset.mean(0), offset.std(0)
        lines.append(f"| {weights} | {len(cells)} x {len(cells)} inner of {n} x {n} | {g[0]:+.1f}, {g[1]:+.1f} | "
                     f"{m[0]:+.1f}, {m[1]:+.1f} | {sd[0]:.1f}, {sd[1]:.1f} |")
    record("receptive_fields", figures, f"#### EfficientNet-Lite0's last block at {args.size} px: where its cells "
           "look\n\n" + "\n".join(lines), doc=ROOT / "docs" / "results" / "explain.md")


if __name__ == "__main__":
    main()
