"""Probe (issue 13): would lesion-level supervision help mini-MIAS's MG branch?

mini-MIAS's Info.txt gives each abnormality's centre and radius. Training may use them
(inference would not: the model must find lesions itself), for instance by telling the
branch's attention over tiles where the lesion is. That can only help if the frozen
features of the tile that holds the lesion tell lesions from normal tissue, and benign
from malignant, better than the whole image does. This probe measures that, before any
model is built, on the activation maps the search runs cache (partial mode, the plain
image; tiles = k x k map cells, as `attention_cell`), per fold: fitted on the training
portion, scored on the **test split** (never the validation fold):

* normal vs abnormal, by image: (a) a logistic regression on the image's mean feature;
  (b) a tile classifier (lesion tiles of abnormal training images against every tile of
  normal training images), an image scored by its most suspicious tile.
  (c) as (b) on [tile, tile - the same tile of the other breast] (both breasts are oriented
  chest wall left; zeros where the other breast is missing).
* benign vs malignant, abnormal images with a lesion centre only: (a) the image's mean
  feature; (b) the feature of the tile that holds the lesion centre (an oracle location).

    python bench/lesion_tile_probe.py --set model.backbone.name=efficientnet_lite2 \\
        --set model.backbone.image_size=512 --set model.backbone.pooling=attention \\
        --set model.backbone.attention_cell=4 --folds 10
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, append_jsonl, command, fold_means  # noqa: E402
from probe import branch_data, probe_arguments, standardised_logistic  # noqa: E402

from breastfusion.datasets.mias import mias_lesions  # noqa: E402
from breastfusion.explain.localisation import circle_mask, to_model_space  # noqa: E402
from breastfusion.provenance import git_commit, now  # noqa: E402
from breastfusion.vocab import Label, Modality  # noqa: E402

MIAS_ROOT = ROOT.parent / "shared" / "datasets" / "mini-MIAS"


def tile_grid(activation: np.ndarray, cell: int) -> np.ndarray:
    """(C, H, W) -> (T, C): tiles of cell x cell map positions, row-major."""
    c, h, w = activation.shape
    a = activation[:, : h - h % cell, : w - w % cell].astype(np.float32)
    return a.reshape(c, h // cell, cell, w // cell, cell).mean(axis=(2, 4)).reshape(c, -1).T


def lesion_tile(mask: np.ndarray, tiles_per_side: int) -> int | None:
    """The tile (row-major index) that holds most of the lesion mask, None if it is empty."""
    side = mask.shape[0] // tiles_per_side
    m = mask[: side * tiles_per_side, : side * tiles_per_side]
    counts = m.reshape(tiles_per_side, side, tiles_per_side, side).sum(axis=(1, 3)).ravel()
    return int(counts.argmax()) if counts.max() > 0 else None


@dataclass
class Film:
    tiles: np.ndarray  # (T, C)
    label: int  # Label index
    lesion: int | None  # the tile that holds the located lesion, None if none is located
    bilateral: np.ndarray  # (T, 2C): [tile, tile - the other breast's same tile]


def fit_auc(x_train, y_train, x_test, y_test, c_reg: float) -> float:
    clf = standardised_logistic(c_reg, balanced=True).fit(x_train, y_train)
    return float(roc_auc_score(y_test, clf.predict_proba(x_test)[:, 1]))


def suspicious_tile_auc(films: dict[str, Film], train, test, field: str, c_reg: float) -> float:
    """Normal vs abnormal: a tile classifier fitted on the located lesion tiles of the training
    films against every tile of the normal training films, a test film scored by its most
    suspicious tile; `field` names the tile features ("tiles" or "bilateral")."""
    pos = [getattr(films[c], field)[films[c].lesion] for c in train if films[c].lesion is not None]
    neg = [t for c in train if films[c].label == 0 for t in getattr(films[c], field)]
    y = np.array([1] * len(pos) + [0] * len(neg))
    clf = standardised_logistic(c_reg, balanced=True).fit(np.stack(pos + neg), y)
    worst = [clf.predict_proba(getattr(films[c], field))[:, 1].max() for c in test]
    return float(roc_auc_score([films[c].label > 0 for c in test], worst))


def main() -> None:
    args = probe_arguments(__doc__, ("mias",), extra=lambda ap: ap.add_argument(
        "--c", type=float, default=0.01, help="inverse L2 strength of every regression"))
    cfg, data = branch_data(args.data, args.sets, bilateral=False)
    bb = cfg.model.backbone_for(Modality.MG)
    lesions = {Path(p).stem: v for p, v in mias_lesions(MIAS_ROOT).items()}
    pre = data.source.cache(Modality.MG).preprocessor
    films: dict[str, Film] = {}
    v = len(data.instances[0].mg) // 2
    for inst in data.instances:
        k = next(k for k in range(v) if inst.mg[k] is not None)
        rec, other = inst.mg[k], inst.mg[v + k]
        grid = tile_grid(np.asarray(data.features[rec.path][0]), bb.attention_cell)
        diff = (grid - tile_grid(np.asarray(data.features[other.path][0]), bb.attention_cell)
                if other is not None and other.path in data.features else np.zeros_like(grid))
        per_side = int(round(np.sqrt(grid.shape[0])))
        where = None
        circles = lesions.get(Path(rec.path).stem, [])
        if circles and inst.label is not Label.NORMAL:
            _, info = pre.process_info(rec.path, Modality.MG, rec.side)
            mask = np.zeros(info.shape, dtype=bool)
            for x, y, r in circles:
                mask |= circle_mask(info.shape, (x, y), r)
            where = lesion_tile(to_model_space(mask, info, bb.image_size), per_side)
        films[inst.case_id] = Film(grid, inst.label.index, where, np.concatenate([grid, diff], axis=1))
    located = sum(f.lesion is not None for f in films.values())
    print(f"{len(films)} images, {located} with a lesion tile", flush=True)
    result = {"command": command(), "commit": git_commit(), "finished": now(), "overrides": args.sets,
              "c": args.c, "folds": []}

    def means(cases):
        return np.stack([films[c].tiles.mean(axis=0) for c in cases])

    for split in data.splits[: args.folds]:
        train = [c for c in split.train if c in films]
        test = [c for c in split.test if c in films]
        fold = {"fold": split.fold}
        fold["abnormal: image mean"] = fit_auc(means(train), [films[c].label > 0 for c in train],
                                               means(test), [films[c].label > 0 for c in test], args.c)
        fold["abnormal: most suspicious tile"] = suspicious_tile_auc(films, train, test, "tiles", args.c)
        fold["abnormal: most suspicious tile, bilateral"] = suspicious_tile_auc(films, train, test, "bilateral",
                                                                                args.c)
        # benign vs malignant where the lesion is located
        lab_tr = [c for c in train if films[c].lesion is not None]
        lab_te = [c for c in test if films[c].lesion is not None]
        yb_tr = [films[c].label == 2 for c in lab_tr]
        yb_te = [films[c].label == 2 for c in lab_te]
        if len(set(yb_te)) == 2 and len(set(yb_tr)) == 2:
            fold["malignant: image mean"] = fit_auc(means(lab_tr), yb_tr, means(lab_te), yb_te, args.c)
            fold["malignant: lesion tile (oracle)"] = fit_auc(
                np.stack([films[c].tiles[films[c].lesion] for c in lab_tr]), yb_tr,
                np.stack([films[c].tiles[films[c].lesion] for c in lab_te]), yb_te, args.c)
        print(json.dumps(fold), flush=True)
        result["folds"].append(fold)
    result["mean"] = fold_means(result["folds"])
    for k, val in result["mean"].items():
        n = sum(k in f for f in result["folds"])
        print(f"{k}: test-split AUC {100 * val:.1f} ({n} folds)")
    append_jsonl("lesion_tile_probe", result)

if __name__ == "__main__":
    main()
