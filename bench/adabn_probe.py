"""Probe (issue 13): do BatchNorm statistics estimated on mammograms make better frozen features?

The frozen backbone normalises every layer with ImageNet's running means and variances. A
mammogram (grey, half of it black background, a dense bright breast) drives the layers far
from those statistics, so many units sit saturated or dead. Re-estimating the statistics on
the target images ("AdaBN", Li et al. 2016, arXiv:1603.04779) adapts the network to the
domain without a label or a gradient: one extra pass over the images. This probe asks
whether it helps before anything is built: per breast (CC and MLO averaged, plain image)
the head map of the frozen backbone pooled (average, generalised mean), alone and with the
other breast's difference appended (the preset's bilateral design), into a standardised
multinomial logistic regression fitted on each fold's training portion and scored on its
**test split** (never the validation fold), once with ImageNet's statistics and once with
the re-estimated ones.

The statistics here are estimated on every image of the dataset at once (no labels are
read), which is transductive: a product feature would estimate them on the training
portion only. Two moments per channel leak little; a gain too small to survive that
caveat would not be worth building anyway.

    python bench/adabn_probe.py --data cdd-cesm --set model.backbone.name=efficientnet_lite2 \\
        --set model.backbone.image_size=512 --set model.backbone.pooling=attention \\
        --set model.backbone.attention_cell=4 --set model.bilateral=true --folds 10

(the preset's MG branch, so that preparation reads its activation cache instead of computing one)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe import branch_data, breast_vectors, probe_arguments, run_probe  # noqa: E402

from breastfusion.models.backbones import build_backbone, pool  # noqa: E402
from breastfusion.vocab import Modality  # noqa: E402


def image_batches(records, source, size: int):
    """The plain preprocessed images of `records`, `size` at a time: (paths, (B, 1, H, W))."""
    for start in range(0, len(records), size):
        chunk = records[start:start + size]
        images = [torch.from_numpy(source.get(r.path, r.modality, r.side)).unsqueeze(0) for r in chunk]
        yield [r.path for r in chunk], torch.stack(images)


@torch.no_grad()
def adapt_statistics(backbone, records, source, batch: int) -> None:
    """Every BatchNorm's running mean and variance replaced by their average over `records`'
    batches (momentum None: a cumulative average), each layer seeing the adapted layers
    before it."""
    norms = [m for m in backbone.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for _, images in image_batches(records, source, batch):
        backbone.feature_map(images)
    for m in norms:
        m.eval()


@torch.no_grad()
def pooled(backbone, records, source, batch: int) -> dict[str, dict[str, np.ndarray]]:
    """path -> {"avg": ..., "gem": ...} of the head map."""
    out = {}
    for paths, images in image_batches(records, source, batch):
        fmap = backbone.feature_map(images)
        avg, gem = pool(fmap, "avg").numpy(), pool(fmap, "gem").numpy()
        for i, p in enumerate(paths):
            out[p] = {"avg": avg[i], "gem": gem[i]}
    return out


def main() -> None:
    args = probe_arguments(__doc__, extra=lambda ap: ap.add_argument(
        "--batch", type=int, default=16, help="images per BatchNorm statistics batch"))
    cfg, data = branch_data(args.data, args.sets)
    records = list({r.path: r for i in data.instances for r in i.mg if r is not None}.values())
    backbone = build_backbone(cfg.model.backbone_for(Modality.MG)).eval()
    start = time.perf_counter()
    imagenet = pooled(backbone, records, data.source, args.batch)
    adapt_statistics(backbone, records, data.source, args.batch)
    adapted = pooled(backbone, records, data.source, args.batch)
    print(f"{len(records)} images encoded three times in {time.perf_counter() - start:.0f} s")
    vectors, labels = breast_vectors(data, imagenet, "imagenet-bn")
    for c, v in breast_vectors(data, adapted, "adapted-bn")[0].items():
        vectors[c].update(v)
    run_probe("adabn_probe", data.splits[: args.folds], vectors, labels, (0.001, 0.01, 0.1),
              data=args.data, overrides=args.sets)


if __name__ == "__main__":
    main()
