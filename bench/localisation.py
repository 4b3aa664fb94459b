"""Grad-CAM localisation on the synthetic cohort, where the generator knows every lesion:
a fine-tuned (or frozen) single-US or single-MG model against its shuffled-weights copy and a
centre prior.

Usage: python bench/localisation.py [--size 224] [--patients 160] [--epochs 12] [--head plain]
       [--mode finetune] [--modality US] [--views all] [--check]

One fold of a 4-fold patient split is trained (EfficientNet-Lite0, ImageNet weights,
stem frozen in fine-tune mode, AdamW lr 3e-4, batch 16) and every lesion image of
its validation patients is explained for the "abnormal" target (gradcam.ABNORMAL),
with the backbone's last convolutional block, drawn two ways: by the library's plain
resize (the default) and with each cell at its receptive field's geometric centre
(gradcam.receptive_field_centres, "RF centres"). Also reported: the grid ceiling, the
hit rate of a map that peaks at the Grad-CAM cell nearest to the lesion's centre (a
Grad-CAM maximum can only lie on a cell centre of the backbone's last grid, stride 32:
4 x 4 cells at 128 px, 7 x 7 at 224 px), for both placements. MG (`--modality MG`):
the single MG row on the four views or, `--views synthesized`, the two C-View ones.
Writes a section of docs/results/explain.md.

Issue 5's criterion, judged on every run and recorded with its figures (the test suite
does not train this model: `bench/localisation.py --size 320` takes about 5 minutes on 2
cores): the trained model's Grad-CAM maximum lies inside the lesion for more than half of
the lesion images, the shuffled-weights copy's for fewer than a tenth, and the energy inside
the lesion is at least 5 times the lesion's area share. `--check`: exit with status 1 when
it is not met (after recording).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import yaml
from common import ROOT, WORK, Clock, quiet_logs, record, synthetic_cohort

from breastfusion.config import BackboneConfig, to_dict
from breastfusion.explain.folds import explain_row, shuffle_weights, synthetic_lesions
from breastfusion.explain.gradcam import CellCentres, receptive_field_centres
from breastfusion.explain.localisation import summarize
from breastfusion.models.backbones import build_backbone
from breastfusion.presets import localisation_row
from breastfusion.training.fold import run_fold
from breastfusion.training.preparation import prepare
from breastfusion.vocab import MG_SLOTS, Kind, Modality


def grid_ceiling(items, centres) -> float:
    """Share of lesions that contain the cell centre nearest to their own centre (a Grad-CAM
    maximum can only lie on a cell centre: `centres`, gradcam.CellCentres)."""
    hits = []
    for e in items:
        rows, cols = np.nonzero(e.lesion)
        r = int(round(centres.rows[np.argmin(abs(centres.rows - rows.mean()))]))
        c = int(round(centres.cols[np.argmin(abs(centres.cols - cols.mean()))]))
        size = e.lesion.shape[0]
        hits.append(bool(e.lesion[min(max(r, 0), size - 1), min(max(c, 0), size - 1)]))
    return float(np.mean(hits))


def peak_offset(items) -> list[float]:
    """Median offset of each map's maximum from its lesion's centre, in lesion radii (the
    radius of a disc of the lesion's area): [down, right]."""
    offsets = []
    for e in items:
        rows, cols = np.nonzero(e.lesion)
        radius = np.sqrt(len(rows) / np.pi)
        y, x = np.unravel_index(np.argmax(e.heatmap), e.heatmap.shape)
        offsets.append(((y - rows.mean()) / radius, (x - cols.mean()) / radius))
    return [round(float(v), 2) for v in np.median(offsets, axis=0)]


def fmt(offset: list[float]) -> str:
    return f"{offset[0]:+.1f}, {offset[1]:+.1f}"


def resize_centres(size: int, cells: int) -> CellCentres:
    """Where the library's plain resize draws the cells."""
    at = (np.arange(cells) + 0.5) * size / cells - 0.5
    return CellCentres(at, at, (size, size))


CRITERION = "hit rate > 50%, shuffled hit rate < 10%, energy inside >= 5 x lesion area"


def criterion(trained: dict, shuffled: dict) -> dict:
    """Issue 5's criterion on the summaries (explain.localisation.summarize, class "all") of
    the trained model and its shuffled-weights copy."""
    checks = {"hit_rate_over_half": trained["gradcam_hit_rate"] > 0.5,
              "shuffled_hit_rate_under_a_tenth": shuffled["gradcam_hit_rate"] < 0.1,
              "energy_at_least_5x_lesion_area": trained["gradcam_energy"] >= 5 * trained["lesion_fraction"]}
    return {"criterion": CRITERION, **checks, "met": all(checks.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--patients", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--head", choices=["plain", "paper"], default="plain")
    ap.add_argument("--mode", choices=["finetune", "cached"], default="finetune")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--modality", choices=["US", "MG"], default="US")
    ap.add_argument("--views", choices=["all", "synthesized"], default="all",
                    help="MG: the four views, or the two synthesized (C-View) ones")
    ap.add_argument("--check", action="store_true", help="exit with status 1 when issue 5's criterion is not met")
    args = ap.parse_args()
    modality = Modality(args.modality)
    manifest = synthetic_cohort(args.patients, image_size=args.size, us_per_patient=(2, 3), seed=args.seed)
    root = WORK / f"synth_{args.patients}p_{args.size}px_us2-3_s{args.seed}"
    row = localisation_row(args.modality, args.size, args.epochs, args.mode, args.head)
    if modality is Modality.MG and args.views == "synthesized":
        row.model.mg_slots = [s.name for s in MG_SLOTS if s.kind is Kind.SYNTHESIZED]
    views = f"_{args.views}" if modality is Modality.MG else ""
    prefix = f"MG{views}_" if modality is Modality.MG else ""  # US: the names of earlier runs
    name = f"localise_{prefix}{args.mode}_{args.head}_{args.size}px_{args.patients}p_{args.epochs}e"
    row_dir = WORK / name / "row"
    row_dir.mkdir(parents=True, exist_ok=True)
    row.train.cache_dir = str(WORK / "cache")
    (row_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(row), sort_keys=False))
    fold = row_dir / "folds" / "fold_0"
    timing = row_dir / "train_seconds.json"  # a rerun explains the fold trained before
    trained_now = not (fold / "predictions.csv").is_file()
    with quiet_logs(), Clock() as train_clock:
        data = prepare(manifest, row, progress=False)
        if trained_now:
            run_fold(data, data.splits[0], row, fold, progress=False)
    if trained_now:
        timing.write_text(json.dumps({"train_s": train_clock.seconds}))
    train_s = json.loads(timing.read_text())["train_s"] if timing.is_file() else float("nan")
    fit = json.loads((fold / "fit.json").read_text())
    lesions = synthetic_lesions(root / "lesions.csv")
    with Clock() as explain_clock:
        trained = explain_row(row_dir, manifest, modality, lesions, progress=False, target="abnormal")
        aligned = explain_row(row_dir, manifest, modality, lesions, progress=False, target="abnormal",
                              align=True)
        shuffled = explain_row(row_dir, manifest, modality, lesions, progress=False, target="abnormal",
                               perturb=shuffle_weights())
    t, s = summarize(e.score for e in trained)[-1], summarize(e.score for e in shuffled)[-1]
    a = summarize(e.score for e in aligned)[-1]
    backbone = build_backbone(BackboneConfig(name=row.model.backbone.name, weights="none"))
    centres = receptive_field_centres(backbone, backbone.cam_layer, (args.size, args.size))
    ceiling = grid_ceiling(trained, resize_centres(args.size, len(centres.rows)))
    ceiling_aligned = grid_ceiling(trained, centres)
    val = pd.read_csv(fold / "predictions.csv")
    verdict_5 = criterion(t, s)
    figures = {"config": to_dict(row), "best_epoch": fit["best_epoch"], "best_test_auc": fit["best_test_score"],
               "validation_instances": len(val), "trained": t, "trained_receptive_field_centres": a,
               "shuffled": s, "grid_ceiling": ceiling, "grid_ceiling_receptive_field_centres": ceiling_aligned,
               "peak_offset_radii": peak_offset(trained),
               "peak_offset_radii_receptive_field_centres": peak_offset(aligned),
               "train_s": train_s, "explain_s": explain_clock.seconds, "issue_5": verdict_5}
    line = (f"| {args.modality}{views.replace('_', ' ')} | {args.mode} | {args.head} | {args.size} | "
            f"{args.patients} | {args.epochs} | {fit['best_test_score']:.2f} | {t['n']} | "
            f"{t['gradcam_hit_rate']:.0%} | {a['gradcam_hit_rate']:.0%} | {s['gradcam_hit_rate']:.0%} | "
            f"{t['prior_hit_rate']:.0%} | {ceiling:.0%} / {ceiling_aligned:.0%} | "
            f"{t['gradcam_energy']:.1%} | {a['gradcam_energy']:.1%} | {s['gradcam_energy']:.1%} | "
            f"{t['lesion_fraction']:.1%} | {fmt(figures['peak_offset_radii'])} / "
            f"{fmt(figures['peak_offset_radii_receptive_field_centres'])} | {train_s:.0f} |")
    header = ("| modality | mode | head | px | patients | epochs | test AUC (macro, best epoch) | lesion images "
              "| hit trained | hit trained, RF centres | hit shuffled | hit centre prior | grid ceiling (resize / RF "
              "centres) | energy trained | energy trained, RF centres | energy shuffled | lesion area "
              "| maximum's offset from the lesion centre, radii down, right (resize / RF centres) | train s |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ratio = t["gradcam_energy"] / t["lesion_fraction"]
    judged = (f"Issue 5's criterion ({CRITERION}): hit {t['gradcam_hit_rate']:.0%}, shuffled "
              f"{s['gradcam_hit_rate']:.0%}, energy {ratio:.1f} x lesion area: "
              f"{'met' if verdict_5['met'] else 'NOT met'}.")
    record(name, figures, f"#### {name}\n\n{header}\n{line}\n\n{judged}",
           doc=ROOT / "docs" / "results" / "explain.md")
    if args.check and not verdict_5["met"]:
        raise SystemExit(f"issue 5's criterion not met: {verdict_5}")


if __name__ == "__main__":
    main()
