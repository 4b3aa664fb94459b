"""Probe (issue 13): can mini-MIAS's lesion annotations teach the frozen features where to look?

mini-MIAS gives each abnormality's centre and radius (Info.txt). A whole-image label on 258
films is too weak a signal for a lesion a few percent of the breast wide; the annotations
say which of the frozen head map's 16 x 16 cells hold it. This probe trains, inside each
fold's training portion, a cell classifier on the preset's cached head map (Lite2, 512 px,
stride 32): cells inside an annotated lesion get their image's class (benign / malignant),
every other breast cell is normal; then it scores every breast cell of a film and
summarises the film by its most suspicious cells (per class, the maximum and the mean of the
top 3), with the other breast's summary and the difference appended (the preset's bilateral
design), into a small logistic regression. The second stage learns on out-of-fold cell
scores (5 inner splits of the training patients), so it sees what a new patient's film
gives. Scored by macro AUC on each fold's **test split** (never the validation fold), beside
the pooled-feature probe on the same splits and the mean of the two probabilities.

Only training needs annotations; a prediction needs the film alone.

    python bench/lesion_probe.py --set model.backbone.name=efficientnet_lite2 \\
        --set model.backbone.image_size=512 --set model.backbone.pooling=attention \\
        --set model.backbone.attention_cell=4 --set model.bilateral=true --folds 10
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupKFold

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT  # noqa: E402
from probe import branch_data, breast_vectors, designs, probe_arguments, record_probe, standardised_logistic  # noqa: E402

from breastfusion.evaluation.metrics import macro_auc  # noqa: E402
from breastfusion.explain.folds import mias_circles  # noqa: E402
from breastfusion.explain.localisation import to_model_space  # noqa: E402
from breastfusion.vocab import Modality  # noqa: E402

MIAS_ROOT = ROOT.parent / "shared" / "datasets" / "mini-MIAS"
NORMAL_CELLS_PER_FIT = 6000  # normal cells sampled for each cell classifier (all lesion cells are kept)


def cell_table(data, size: int):
    """Per film: its cells' features (n, C), which cells are breast, each cell's class
    (0 normal, 1 benign, 2 malignant, -1 left out of cell training), and the film's case."""
    lesions = mias_circles(MIAS_ROOT)
    pre = data.source.preprocessor(Modality.MG)
    films = {}
    for inst in data.instances:
        v = len(inst.mg) // 2
        for rec in inst.mg[:v]:
            if rec is None or rec.path not in data.features:
                continue
            fmap = np.asarray(data.features[rec.path][0], dtype=np.float32)  # (C, h, w), plain image
            c, h, w = fmap.shape
            img, info = pre.process_info(rec.path, rec.modality, rec.side)
            breast = (img > 0.02).reshape(h, size // h, w, size // w).mean(axis=(1, 3)) > 0.3
            cls = np.zeros((h, w), dtype=np.int64)
            label = inst.label.index
            src = lesions(rec.path, tuple(info.shape))
            if label > 0:
                if src is None:  # abnormal, not localised (e.g. widespread calcifications)
                    cls[:] = -1
                else:
                    inside = to_model_space(src, info, size).reshape(h, size // h, w, size // w).mean(axis=(1, 3))
                    cls[inside >= 0.25] = label
            films[inst.case_id] = (fmap.reshape(c, -1).T, breast.reshape(-1), cls.reshape(-1))
    return films


def fit_cells(films, cases, rng):
    """A cell classifier on the breast cells of `cases`' films (normal cells subsampled)."""
    x, y = [], []
    for case in cases:
        feats, breast, cls = films[case]
        keep = breast & (cls >= 0)
        x.append(feats[keep])
        y.append(cls[keep])
    x, y = np.concatenate(x), np.concatenate(y)
    normal = np.flatnonzero(y == 0)
    if len(normal) > NORMAL_CELLS_PER_FIT:
        drop = np.setdiff1d(normal, rng.choice(normal, NORMAL_CELLS_PER_FIT, replace=False))
        x, y = np.delete(x, drop, axis=0), np.delete(y, drop)
    return standardised_logistic(0.01, balanced=True).fit(x, y)


def summary(clf, films, case) -> np.ndarray:
    """A film's most suspicious cells: per abnormal class, the maximum and the top-3 mean."""
    feats, breast, _ = films[case]
    p = clf.predict_proba(feats[breast] if breast.any() else feats)
    top = np.sort(p[:, 1:], axis=0)[::-1]
    return np.concatenate([top[0], top[:3].mean(axis=0)])


def main() -> None:
    args = probe_arguments(__doc__, ("mias",))
    cfg, data = branch_data(args.data, args.sets)
    films = cell_table(data, cfg.model.backbone_for(Modality.MG).image_size)
    other_of = {}  # case -> the other breast's case (same woman)
    by_group: dict[str, list[str]] = {}
    for inst in data.instances:
        if inst.case_id in films:
            by_group.setdefault(inst.group, []).append(inst.case_id)
    for cases in by_group.values():
        for c in cases:
            others = [o for o in cases if o != c]
            other_of[c] = others[0] if others else None
    labels = {i.case_id: i.label.index for i in data.instances if i.case_id in films}
    group_of = {i.case_id: i.group for i in data.instances}
    cells = {c: int((f[2] > 0).sum()) for c, f in films.items()}
    print(f"{len(films)} films, {sum(v > 0 for v in cells.values())} with lesion cells "
          f"({sum(cells.values())} cells); {sum((f[2] < 0).all() for f in films.values())} abnormal, not localised")
    per_image = {p: {"pooled": np.asarray(f[0], dtype=np.float32).mean(axis=(1, 2))} for p, f in data.features.items()}
    pooled, _ = breast_vectors(data, per_image)  # the head map's mean per breast, with the bilateral design
    rng = np.random.default_rng(0)
    folds = []
    for split in data.splits[: args.folds]:
        train = [c for c in split.train if c in films]
        test = [c for c in split.test if c in films]
        # out-of-fold summaries for the training films, the full-portion classifier's for the test films
        summ = {}
        inner = GroupKFold(n_splits=5)
        for fit_idx, score_idx in inner.split(train, groups=[group_of[c] for c in train]):
            clf = fit_cells(films, [train[i] for i in fit_idx], rng)
            for i in score_idx:
                summ[train[i]] = summary(clf, films, train[i])
        clf = fit_cells(films, train, rng)
        for c in test:
            summ[c] = summary(clf, films, c)
        for c in test + train:  # the other breast's film may sit in neither list (a left-out film)
            o = other_of.get(c)
            if o is not None and o not in summ:
                summ[o] = summary(clf, films, o)
        vec = designs(summ, {c: summ.get(other_of.get(c)) if other_of.get(c) else None for c in summ})
        y_train = np.array([labels[c] for c in train])
        y_test = np.array([labels[c] for c in test])
        fold = {"fold": split.fold}
        probs = {}
        for name, table, key, c_reg in (("lesion cells bilateral", vec, "bilateral", 1.0),
                                        ("pooled bilateral", pooled, "pooled bilateral", 0.1)):
            model = standardised_logistic(c_reg).fit(np.stack([table[c][key] for c in train]), y_train)
            probs[name] = model.predict_proba(np.stack([table[c][key] for c in test]))
            fold[name] = macro_auc(y_test, probs[name])
        fold["mean of both"] = macro_auc(y_test, (probs["lesion cells bilateral"] + probs["pooled bilateral"]) / 2)
        print(fold, flush=True)
        folds.append(fold)
    record_probe("lesion_probe", folds, data="mias", overrides=args.sets)


if __name__ == "__main__":
    main()
