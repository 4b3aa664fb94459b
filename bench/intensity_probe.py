"""Probe (issue 13): do a breast's intensity and blob statistics add to the frozen CNN features?

Frozen ImageNet features describe a mammogram's texture and shape, not its absolute grey
levels: on contrast-enhanced (subtracted) images, an enhancing lesion is a bright blob, and
how bright and how large it is may be what separates a benign from a malignant breast. This
probe computes, per image, a few dozen hand-made statistics inside the breast (grey-level
percentiles and moments; the strongest responses of difference-of-Gaussians blob filters at
four scales, i.e. bright spots of 2 to 16 mm), averages them over a breast's views, and asks
whether they carry a signal alone and beside the preset's pooled CNN features (read from its
activation cache), concatenated or as a second regression whose probabilities are averaged
with the CNN regression's (late fusion): standardised multinomial logistic regressions fitted on each fold's
training portion and scored on its **test split** (never the validation fold), each design
also with the other breast's difference appended (the preset's bilateral design).

    python bench/intensity_probe.py --data cdd-cesm --set model.backbone.name=efficientnet_lite2 \\
        --set model.backbone.image_size=512 --set model.backbone.pooling=attention \\
        --set model.backbone.attention_cell=4 --set model.bilateral=true --folds 10
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage, stats

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import patient_macro_auc  # noqa: E402
from probe import (  # noqa: E402
    branch_data,
    breast_vectors,
    probe_arguments,
    probe_folds,
    record_probe,
    standardised_logistic,
)

from breastfusion.choices import FrozenStage  # noqa: E402
from breastfusion.evaluation.aggregate import PROBA_COLUMNS  # noqa: E402
from breastfusion.evaluation.metrics import macro_auc  # noqa: E402
from breastfusion.vocab import Modality  # noqa: E402

PERCENTILES = (10, 25, 50, 75, 90, 95, 99, 99.5, 99.9)
BLOB_SIGMAS = (2, 4, 8, 16)  # pixels of the preprocessed image (512 px for a breast of ~20 cm: ~0.4 mm each)


def intensity_statistics(image: np.ndarray) -> np.ndarray:
    """Statistics of one preprocessed image (H, W) in [0, 1] inside its breast (pixels above
    the background): grey-level percentiles, mean, spread, skewness, kurtosis, the breast's
    area, the fraction of the breast brighter than its median by 2 and 4 spreads, and per
    blob scale the 99th, 99.9th percentile and maximum of the difference of Gaussians."""
    img = image.astype(np.float32)
    breast = img > 0.02
    if breast.sum() < 100:
        breast = np.ones_like(breast)
    values = img[breast]
    med, sd = float(np.median(values)), float(values.std()) + 1e-6
    out = [*np.percentile(values, PERCENTILES), values.mean(), sd, stats.skew(values), stats.kurtosis(values),
           breast.mean(), (values > med + 2 * sd).mean(), (values > med + 4 * sd).mean()]
    for s in BLOB_SIGMAS:
        dog = ndimage.gaussian_filter(img, s) - ndimage.gaussian_filter(img, 2 * s)
        inside = dog[breast]
        out += [*np.percentile(inside, (99, 99.9)), inside.max()]
    return np.asarray(out, dtype=np.float32)


def main() -> None:
    args = probe_arguments(__doc__, extra=lambda ap: ap.add_argument(
        "--with-run", type=Path, default=None, help="a bench/search.py run folder of the same data: also average "
        "its saved test-split probabilities with the statistics' regression's"))
    cfg, data = branch_data(args.data, args.sets)
    if cfg.model.backbone_for(Modality.MG).frozen != FrozenStage.ALL:
        raise SystemExit("the probe pools the frozen head map: leave model.backbone.frozen at all")
    per_image = {}
    for inst in data.instances:
        for r in inst.mg:
            if r is None or r.path in per_image or r.path not in data.features:
                continue
            fmap = np.asarray(data.features[r.path][0], dtype=np.float32)  # the plain image's head map
            cnn = fmap.mean(axis=(1, 2))
            hand = intensity_statistics(data.source.get(r.path, r.modality, r.side))
            per_image[r.path] = {"cnn": cnn, "hand": hand, "cnn+hand": np.concatenate([cnn, hand])}
    vectors, labels = breast_vectors(data, per_image, args.data)
    print(f"{len(vectors)} breasts, {len(per_image)} images")
    splits = data.splits[: args.folds]
    folds = probe_folds(splits, vectors, labels, (0.001, 0.01, 0.1))
    for fold, split in zip(folds, splits, strict=True):
        fold.update(late_fusion(split, vectors, labels, args.data))
        if args.with_run is not None:
            fold.update(with_trained_branch(split, vectors, labels, args.data, args.with_run))
    record_probe("intensity_probe", folds, data=args.data, overrides=args.sets,
                 with_run=str(args.with_run) if args.with_run else None)


def with_trained_branch(split, vectors, labels, tag: str, run: Path, weights=(1.0, 0.85, 0.7, 0.5)):
    """A trained branch's saved test-split probabilities (search.py's RUN/fold_K, its best
    test-split epoch) averaged with the bilateral statistics regression's (C 0.01), weight w
    on the branch's: breast-level macro AUC per w, as search.py scores."""
    table = pd.read_csv(run / f"fold_{split.fold}" / "test_predictions.csv")
    train = [c for c in split.train if c in vectors]
    key = f"{tag} hand bilateral"
    model = standardised_logistic(0.01).fit(np.stack([vectors[c][key] for c in train]),
                                            np.array([labels[c] for c in train]))
    stats = model.predict_proba(np.stack([vectors[c][key] for c in table["case_id"]]))
    out = {}
    for w in weights:
        mixed = table.copy()
        mixed[PROBA_COLUMNS] = w * table[PROBA_COLUMNS].to_numpy(float) + (1 - w) * stats
        out[f"trained branch weight {w}"] = patient_macro_auc(mixed)
    return out


def late_fusion(split, vectors, labels, tag: str, weights=(0.5, 0.7)) -> dict[str, float]:
    """The bilateral CNN regression (C 0.001) and the bilateral statistics regression (C 0.01),
    fitted apart, their probabilities averaged with weight w on the CNN's: macro AUC per w."""
    train = [c for c in split.train if c in vectors]
    test = [c for c in split.test if c in vectors]
    y_train = np.array([labels[c] for c in train])
    probs = {}
    for design, c_reg in (("cnn", 0.001), ("hand", 0.01)):
        key = f"{tag} {design} bilateral"
        model = standardised_logistic(c_reg).fit(np.stack([vectors[c][key] for c in train]), y_train)
        probs[design] = model.predict_proba(np.stack([vectors[c][key] for c in test]))
    y_test = np.array([labels[c] for c in test])
    return {f"late fusion, cnn weight {w}": macro_auc(y_test, w * probs["cnn"] + (1 - w) * probs["hand"])
            for w in weights}


if __name__ == "__main__":
    main()
