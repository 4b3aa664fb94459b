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

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bilateral_probe import designs  # noqa: E402
from common import ROOT, quiet_logs  # noqa: E402
from probe import run_probe  # noqa: E402
from search import DATA, row_config  # noqa: E402

from breastfusion.models.backbones import build_backbone, pool  # noqa: E402
from breastfusion.records import read_manifest  # noqa: E402
from breastfusion.training.preparation import prepare  # noqa: E402
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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--folds", type=int, default=10)
    args = ap.parse_args()
    quiet_logs()
    cfg = row_config("mg-frozen-partialtrain", [*args.sets, "model.backbone.frozen=layer3"])
    if not cfg.model.bilateral:
        raise SystemExit("the probe needs the other breast: add --set model.bilateral=true")
    data = prepare(read_manifest(ROOT / "runs" / "public" / DATA["cdd-cesm"][0]), cfg, progress=False)
    backbone = build_backbone(cfg.model.backbone_for(Modality.MG)).eval()
    per_image = {path: tapped(backbone, copies[0]) for path, copies in data.features.items()}
    own, other, labels = {}, {}, {}  # case -> tap -> the views' mean (other breast: None if missing)
    for inst in data.instances:  # with model.bilateral, inst.mg = this breast's views, then the other's
        v = len(inst.mg) // 2
        mine = [per_image[r.path] for r in inst.mg[:v] if r is not None and r.path in per_image]
        theirs = [per_image[r.path] for r in inst.mg[v:] if r is not None and r.path in per_image]
        if mine:
            labels[inst.case_id] = inst.label.index
            own[inst.case_id] = {t: np.mean([f[t] for f in mine], axis=0) for t in mine[0]}
            other[inst.case_id] = {t: np.mean([f[t] for f in theirs], axis=0) for t in mine[0]} if theirs else None
    taps = list(next(iter(own.values())))
    vectors: dict[str, dict[str, np.ndarray]] = {c: {} for c in own}
    for tap in taps:  # the bilateral probe's two designs, per tap
        per_tap = designs({c: f[tap] for c, f in own.items()},
                          {c: None if o is None else o[tap] for c, o in other.items()})
        for c, d in per_tap.items():
            vectors[c][tap], vectors[c][f"{tap} bilateral"] = d["own"], d["bilateral"]
    print(f"{len(vectors)} breasts; taps {taps}")
    run_probe("depth_probe", data.splits[: args.folds], vectors, labels, (0.001, 0.01, 0.1), overrides=args.sets)


if __name__ == "__main__":
    main()
