"""Probe (issue 13): do earlier stages of the frozen backbone see mammographic findings better?

The MG branch pools the last feature map of a frozen ImageNet backbone (EfficientNet-Lite2's
1x1 head, stride 32). Features of earlier stages are less specific to ImageNet's classes and
finer (stride 16: a 1 cm mass covers a few cells at 512 px), and in transfer to medical
images they are often the better ones. Before a multi-stage branch is built, this probe asks
whether they carry more of CDD-CESM's signal: per breast (CC and MLO averaged, plain image),
the pooled activations of each tapped stage, alone and with the other breast's difference
appended (the bilateral design of the preset), go into a standardised multinomial logistic
regression fitted on each fold's training portion and scored on its **test split** (never the
validation fold).

The stride-16 maps come from the activation cache of partial mode (``frozen=layer3``, the cache
of the search run ``mg-lite2-512-att4-bilateral-layer3``); the later stages are run from them.

    python bench/depth_probe.py --set model.backbone.name=efficientnet_lite2 \\
        --set model.backbone.image_size=512 --set model.backbone.pooling=attention \\
        --set model.backbone.attention_cell=4 --set model.bilateral=true --folds 10
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe import branch_data, breast_vectors, probe_arguments, run_probe  # noqa: E402

from breastfusion.models.backbones import build_backbone, pool  # noqa: E402
from breastfusion.vocab import Modality  # noqa: E402


@torch.no_grad()
def tapped(backbone, stride16: np.ndarray) -> dict[str, np.ndarray]:
    """One image's pooled activations at each tap, from its cached stride-16 map (C, H, W)."""
    x = torch.from_numpy(np.asarray(stride16, dtype=np.float32))[None]
    taps = {"s16 avg": pool(x, "avg"), "s16 gem": pool(x, "gem"), "s16 max": pool(x, "max")}
    steps = backbone._steps[backbone._cut("layer3"):]
    for _, fn in steps[:-1]:  # the stride-32 blocks
        x = fn(backbone.net, x)
    taps["s32 avg"], taps["s32 gem"] = pool(x, "avg"), pool(x, "gem")
    head = steps[-1][1](backbone.net, x)  # the 1x1 head: the map the branch pools now
    taps["head avg"], taps["head gem"] = pool(head, "avg"), pool(head, "gem")
    return {k: v[0].numpy() for k, v in taps.items()}


def main() -> None:
    args = probe_arguments(__doc__, ("cdd-cesm",))
    cfg, data = branch_data(args.data, [*args.sets, "model.backbone.frozen=layer3"])
    backbone = build_backbone(cfg.model.backbone_for(Modality.MG)).eval()
    per_image = {path: tapped(backbone, copies[0]) for path, copies in data.features.items()}
    vectors, labels = breast_vectors(data, per_image)
    taps = list(next(iter(per_image.values())))
    print(f"{len(vectors)} breasts; taps {taps}")
    run_probe("depth_probe", data.splits[: args.folds], vectors, labels, (0.001, 0.01, 0.1), overrides=args.sets)


if __name__ == "__main__":
    main()
