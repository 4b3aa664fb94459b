"""Probe (issue 13): would comparing the two breasts tile by tile beat comparing pooled features?

The bilateral MG branch of `table3-cpu` (models/bilateral.py) compares a view with the same
view of the other breast after pooling: [own, own - other] of the two pooled vectors. A
lesion is a local asymmetry; after pooling it is diluted over the whole breast. Both breasts
are oriented chest wall left by preprocessing, so tile (i, j) of one is roughly the same
region of the other. This probe asks, before building anything, whether the tile-level
difference carries more than the pooled one: a multinomial logistic regression on each
breast's features from the frozen activation maps the search runs cache (partial mode,
the backbone's last map), trained on a fold's training portion and scored on its **test
split** (never the validation fold), for these designs (each view's vector averaged over the
breast's views; tiles = the map averaged over k x k cells, as `attention_cell`):

* ``own``: the tiles' mean;
* ``pooled bilateral``: own mean, own mean - other mean (what the branch sees today, with
  mean instead of learnt attention pooling);
* ``tile bilateral``: the pooled bilateral design plus, per channel, the largest tile of
  (own - other) and the largest tile of own.

    python bench/tile_bilateral_probe.py --set model.backbone.name=efficientnet_lite2 \\
        --set model.backbone.image_size=512 --set model.backbone.pooling=attention \\
        --set model.backbone.attention_cell=4 --set model.bilateral=true --folds 10
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe import branch_data, probe_arguments, run_probe  # noqa: E402

from breastfusion.vocab import Modality  # noqa: E402

C_VALUES = (0.001, 0.01, 0.1)


def tiles(activation: np.ndarray, cell: int) -> np.ndarray:
    """(C, H, W) map of the plain image -> (C, T) tiles, each the mean of cell x cell positions."""
    c, h, w = activation.shape
    a = activation[:, : h - h % cell, : w - w % cell].astype(np.float32)
    return a.reshape(c, h // cell, cell, w // cell, cell).mean(axis=(2, 4)).reshape(c, -1)


def breast_vectors(data, cell: int) -> dict[str, dict[str, np.ndarray]]:
    """case id -> design -> vector, from the views the breast and its other breast both hold."""
    out = {}
    for inst in data.instances:
        v = len(inst.mg) // 2
        own_views, pairs = [], []
        for k in range(v):
            own, other = inst.mg[k], inst.mg[v + k]
            if own is None or own.path not in data.features:
                continue
            t_own = tiles(np.asarray(data.features[own.path][0]), cell)
            own_views.append(t_own)
            if other is not None and other.path in data.features:
                pairs.append((t_own, tiles(np.asarray(data.features[other.path][0]), cell)))
        if not own_views:
            continue
        mean_own = np.mean([t.mean(axis=1) for t in own_views], axis=0)
        if pairs:
            diff_mean = np.mean([a.mean(axis=1) - b.mean(axis=1) for a, b in pairs], axis=0)
            diff_max = np.mean([(a - b).max(axis=1) for a, b in pairs], axis=0)
        else:
            diff_mean = diff_max = np.zeros_like(mean_own)
        own_max = np.mean([t.max(axis=1) for t in own_views], axis=0)
        has = np.array([float(bool(pairs))])
        out[inst.case_id] = {
            "own": mean_own,
            "pooled bilateral": np.concatenate([mean_own, diff_mean, has]),
            "tile bilateral": np.concatenate([mean_own, diff_mean, diff_max, own_max, has]),
        }
    return out


def main() -> None:
    args = probe_arguments(__doc__)
    cfg, data = branch_data(args.data, args.sets)
    cell = cfg.model.backbone_for(Modality.MG).attention_cell
    vectors = breast_vectors(data, cell)
    labels = {i.case_id: i.label.index for i in data.instances}
    print(f"{len(vectors)} breasts; tiles of {cell} x {cell} map cells", flush=True)
    run_probe("tile_bilateral_probe", data.splits[: args.folds], vectors, labels, C_VALUES, data=args.data,
              overrides=args.sets)


if __name__ == "__main__":
    main()
