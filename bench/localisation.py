"""Grad-CAM localisation on the synthetic cohort, where the generator knows every lesion:
a fine-tuned (or frozen) single-US model against its shuffled-weights copy and a centre prior.

Usage: python bench/localisation.py [--size 224] [--patients 160] [--epochs 12] [--head plain]
       [--mode finetune] [--grid-only]

One fold of a 4-fold patient split is trained (EfficientNet-Lite0, ImageNet weights,
stem frozen in fine-tune mode, AdamW lr 3e-4, batch 16) and every lesion image of
its validation patients is explained for the "abnormal" target (gradcam.ABNORMAL),
with the backbone's last convolutional block. Also reported: the grid ceiling, the
hit rate of a map that peaks at the Grad-CAM cell nearest to the lesion's centre
(Grad-CAM's maximum can only lie on a cell centre of the backbone's last grid, stride
32: 4 x 4 cells at 128 px, 7 x 7 at 224 px). Writes a section of docs/results/explain.md.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import yaml
from common import ROOT, WORK, Clock, quiet_logs, record, synthetic_cohort

from breastfusion.config import to_dict
from breastfusion.explain.folds import explain_row, shuffle_weights, synthetic_lesions
from breastfusion.explain.localisation import summarize
from breastfusion.presets import cpu_reference, demo_rows
from breastfusion.training.cv import prepare, run_fold
from breastfusion.vocab import Modality

STRIDE = 32  # the last block of every backbone here


def grid_ceiling(items) -> float:
    """Share of lesions that contain the cell centre nearest to their own centre."""
    hits = []
    for e in items:
        rows, cols = np.nonzero(e.lesion)
        cy, cx = rows.mean(), cols.mean()
        size = e.lesion.shape[0]
        centres = (np.arange(size // STRIDE) + 0.5) * size / (size // STRIDE) - 0.5
        r = int(round(centres[np.argmin(abs(centres - cy))]))
        c = int(round(centres[np.argmin(abs(centres - cx))]))
        hits.append(bool(e.lesion[min(r, size - 1), min(c, size - 1)]))
    return float(np.mean(hits))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--patients", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--head", choices=["plain", "paper"], default="plain")
    ap.add_argument("--mode", choices=["finetune", "cached"], default="finetune")
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    manifest = synthetic_cohort(args.patients, image_size=args.size, us_per_patient=(2, 3), seed=args.seed)
    root = WORK / f"synth_{args.patients}p_{args.size}px_us2-3_s{args.seed}"
    (row,) = [r for r in demo_rows(cpu_reference(image_size=args.size, epochs=args.epochs, copies=1))
              if r.name == "single US"]
    row.cv.folds, row.cv.test_folds = 4, 1
    row.train.mode, row.train.optimizer, row.train.lr, row.train.batch_size = args.mode, "adamw", 3e-4, 16
    if args.mode == "finetune":
        row.model.backbone.frozen = "stem"
    if args.head == "plain":
        row.model.head, row.model.arcface = "plain", False
    name = f"localise_{args.mode}_{args.head}_{args.size}px_{args.patients}p_{args.epochs}e"
    row_dir = WORK / name / "row"
    row_dir.mkdir(parents=True, exist_ok=True)
    row.train.cache_dir = str(WORK / "cache")
    (row_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(row), sort_keys=False))
    with quiet_logs(), Clock() as train_clock:
        data = prepare(manifest, row, progress=False)
        fold = row_dir / "folds" / "fold_0"
        if not (fold / "predictions.csv").is_file():
            run_fold(data, data.splits[0], row, fold, progress=False)
    fit = json.loads((fold / "fit.json").read_text())
    lesions = synthetic_lesions(root / "lesions.csv")
    with Clock() as explain_clock:
        trained = explain_row(row_dir, manifest, Modality.US, lesions, progress=False, target="abnormal")
        shuffled = explain_row(row_dir, manifest, Modality.US, lesions, progress=False, target="abnormal",
                               perturb=shuffle_weights())
    t, s = summarize(e.score for e in trained)[-1], summarize(e.score for e in shuffled)[-1]
    val = pd.read_csv(fold / "predictions.csv")
    figures = {"config": to_dict(row), "best_epoch": fit["best_epoch"], "best_test_auc": fit["best_test_score"],
               "validation_instances": len(val), "trained": t, "shuffled": s, "grid_ceiling": grid_ceiling(trained),
               "train_s": train_clock.seconds, "explain_s": explain_clock.seconds}
    line = (f"| {args.mode} | {args.head} | {args.size} | {args.patients} | {args.epochs} | "
            f"{fit['best_test_score']:.2f} | {t['n']} | {t['gradcam_hit_rate']:.0%} | {s['gradcam_hit_rate']:.0%} | "
            f"{t['prior_hit_rate']:.0%} | {figures['grid_ceiling']:.0%} | {t['gradcam_energy']:.1%} | "
            f"{s['gradcam_energy']:.1%} | {t['lesion_fraction']:.1%} | {train_clock.seconds:.0f} |")
    header = ("| mode | head | px | patients | epochs | test AUC (macro, best epoch) | lesion images | hit trained "
              "| hit shuffled | hit centre prior | grid ceiling | energy trained | energy shuffled | lesion area "
              "| train s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    record(name, figures, f"#### {name}\n\n{header}\n{line}", doc=ROOT / "docs" / "results" / "explain.md")


if __name__ == "__main__":
    main()
