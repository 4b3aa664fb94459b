"""The settings search of issue 13, logged whole: every configuration tried, with its figures.

Each variant is a Table 3 row (the row's meaning kept) with config overrides (``key=value``,
as `breastfusion.config.override`). A variant is trained on the first ``--folds`` of the
10 patient folds and judged by the **test-split** score that picks each fold's best epoch
(macro AUC of the fold's 20% test split; never the validation fold). The validation folds'
patient AUC is recorded beside it, for the record only: settings are chosen on the test
splits. Every run is appended to ``bench/results/search.jsonl`` (run output, not committed)
and its row is appended to the log table of ``docs/results/search.md``, the record.

    python bench/search.py --data busi --variant us-lite0-224-l3
    python bench/search.py --data busi --variant NAME --set train.lr=1e-4 --label lr1e-4

A run interrupted (or extended with a larger ``--folds``) is resumed by the same command: the
folds it finished are read back with the time they took. A label names one config; another
config under the same label is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, command, patient_macro_auc, quiet_logs  # noqa: E402

from breastfusion.config import RunConfig, override, to_dict  # noqa: E402
from breastfusion.presets import cpu_reference, table3_rows  # noqa: E402
from breastfusion.provenance import git_commit, now  # noqa: E402
from breastfusion.records import read_manifest  # noqa: E402
from breastfusion.training.fold import run_fold  # noqa: E402
from breastfusion.training.preparation import prepare  # noqa: E402

DATA = {  # name -> (manifest under runs/public, how to make it)
    "busi": ("busi.csv", "breastfusion public busi ../shared/datasets/BUSI -o runs/public/busi.csv"),
    "cdd-cesm": ("cdd-cesm.csv",
                 "breastfusion public cdd-cesm ../shared/datasets/CDD-CESM -o runs/public/cdd-cesm.csv"),
    "mias": ("mias.csv", "breastfusion public mias ../shared/datasets/mini-MIAS -o runs/public/mias.csv"),
    "virtual": ("virtual-cdd-busi.csv",
                "breastfusion virtual --mg-root ../shared/datasets/CDD-CESM --busi-root ../shared/datasets/BUSI "
                "-o runs/public/virtual-cdd-busi.csv"),
}

PARTIAL = ["train.mode=partial", "train.optimizer=adamw", "train.lr=3e-4", "train.weight_decay=1e-4",
           "train.batch_size=32", "train.epochs=15", "train.feature_copies=3"]

# name -> (Table 3 row, overrides of the frozen 128 px preset, table3-cpu-frozen128: the first table3-cpu)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "us-frozen-128": ("single US", []),  # the old preset, for reference
    "us-lite0-224-l3": ("single US", [*PARTIAL, "model.backbone.image_size=224", "model.backbone.frozen=layer3"]),
    "us-lite0-224-l2": ("single US", [*PARTIAL, "model.backbone.image_size=224", "model.backbone.frozen=layer2"]),
    "us-lite2-260-l3": ("single US", [*PARTIAL, "model.backbone.name=efficientnet_lite2",
                                      "model.backbone.image_size=260", "model.backbone.frozen=layer3"]),
    "mg-frozen-128": ("single MG", []),
    "mg-lite0-384-l3": ("single MG", [*PARTIAL, "model.backbone.image_size=384", "model.backbone.frozen=layer3"]),
    "mg-lite0-512-l3-gem": ("single MG", [*PARTIAL, "model.backbone.image_size=512", "model.backbone.frozen=layer3",
                                          "model.backbone.pooling=gem"]),
    # frozen features (the table3-cpu recipe) at a mammogram's resolution, pooled for small findings
    "mg-frozen-384-gem": ("single MG", ["model.backbone.image_size=384", "model.backbone.pooling=gem"]),
    "mg-frozen-512-max": ("single MG", ["model.backbone.image_size=512", "model.backbone.pooling=max"]),
    "mg-frozen-512-avgmax": ("single MG", ["model.backbone.image_size=512", "model.backbone.pooling=avgmax"]),
    # fusion on the virtual cohort: the US branch fine-tuned partially (as us-lite0-224-l3), MG frozen
    "mm-frozen-128": ("concat MM", []),  # the old preset's fusion row, for reference
    "mm-us224l3-mgfrozen": ("concat MM", [*PARTIAL, "model.us_backbone.image_size=224",
                                          "model.us_backbone.frozen=layer3"]),
    "us-us224l3-mgfrozen": ("single US", [*PARTIAL, "model.us_backbone.image_size=224",
                                          "model.us_backbone.frozen=layer3"]),
    # the MG branch of a preset whose training is partial (AdamW 3e-4, 15 epochs): frozen MG backbone
    "mg-frozen-partialtrain": ("single MG", [*PARTIAL]),
}


def row_config(variant: str, extra: list[str]) -> RunConfig:
    row_name, edits = VARIANTS[variant]
    (cfg,) = [r for r in table3_rows(cpu_reference(), "view") if r.name == row_name]
    for item in [*edits, *extra]:
        key, _, value = item.partition("=")
        override(cfg, key, value)
    return cfg.validate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=DATA, required=True)
    ap.add_argument("--variant", choices=VARIANTS, required=True)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra override key=value")
    ap.add_argument("--label", default="", help="name of this run in the log (default: the variant)")
    ap.add_argument("--folds", type=int, default=3, help="train the first N of the 10 folds")
    ap.add_argument("--out", default=str(ROOT / "runs" / "search"))
    args = ap.parse_args()
    quiet_logs()
    manifest_file = ROOT / "runs" / "public" / DATA[args.data][0]
    if not manifest_file.is_file():
        sys.exit(f"{manifest_file} missing; make it with: {DATA[args.data][1]}")
    cfg = row_config(args.variant, args.sets)
    label = args.label or args.variant
    out = Path(args.out) / args.data / label
    claim_run_dir(out, cfg)
    manifest = read_manifest(manifest_file)
    start = time.perf_counter()
    data = prepare(manifest, cfg, progress=False)
    prepared = time.perf_counter() - start
    folds = []
    for split in data.splits[: args.folds]:
        fold_dir = out / f"fold_{split.fold}"
        folds.append(finished_fold(fold_dir) or train_fold(data, split, cfg, fold_dir))
        f = folds[-1]
        print(f"{label} fold {split.fold}: test {f['test_score']:.4f} (epoch {f['best_epoch']}) "
              f"val {f['val_patient_macro_auc']:.4f} {f['seconds']:.0f} s" + (" (done before)" if f["resumed"] else ""),
              flush=True)
    entry = {"data": args.data, "label": label, "variant": args.variant, "row": cfg.name,
             "overrides": VARIANTS[args.variant][1] + args.sets, "folds": folds,
             "test_score": float(np.mean([f["test_score"] for f in folds])),
             "val_patient_macro_auc": float(np.mean([f["val_patient_macro_auc"] for f in folds])),
             "prepare_seconds": prepared,
             "seconds": time.perf_counter() - start + sum(f["seconds"] for f in folds if f["resumed"]),
             "commit": git_commit(), "finished": now(), "command": command(), "config": to_dict(cfg)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "search.jsonl", "a") as fh:
        fh.write(json.dumps(entry) + "\n")
    write_doc(entry)


RUN_CONFIG = "search_config.json"  # the run's whole config: a label names one setting
FOLD_RECORD = "search_fold.json"  # a fold's figures and its training time, written when it is done


def claim_run_dir(out: Path, cfg: RunConfig) -> None:
    """Create the run's folder, or check that the one there holds a run of the same config (its
    finished folds are then read back, not trained again)."""
    config = json.dumps(to_dict(cfg), sort_keys=True, indent=1)
    file = out / RUN_CONFIG
    if file.is_file() and file.read_text() != config:
        sys.exit(f"{out} holds a run of another config; choose another --label or remove the folder")
    if not file.is_file() and any(out.glob("fold_*")):
        sys.exit(f"{out} holds folds of an unrecorded config; choose another --label or remove the folder")
    out.mkdir(parents=True, exist_ok=True)
    file.write_text(config)


def train_fold(data, split, cfg: RunConfig, fold_dir: Path) -> dict:
    t0 = time.perf_counter()
    val = run_fold(data, split, cfg, fold_dir, progress=False)
    fit = json.loads((fold_dir / "fit.json").read_text())
    record = {"fold": split.fold, "test_score": fit["best_test_score"], "best_epoch": fit["best_epoch"],
              "val_patient_macro_auc": patient_macro_auc(val), "seconds": time.perf_counter() - t0}
    (fold_dir / FOLD_RECORD).write_text(json.dumps(record))
    return {**record, "resumed": False}


def finished_fold(fold_dir: Path) -> dict | None:
    """A fold an earlier run of the same config finished (its figures and the time it took then)."""
    file = fold_dir / FOLD_RECORD
    return {**json.loads(file.read_text()), "resumed": True} if file.is_file() else None


MARKER = "<!-- search:log -->"
HEADER = ["| data | run | row | overrides of table3-cpu-frozen128 (the first CPU preset) | folds "
          "| test-split macro AUC (selects) | validation patient macro AUC (reported only) | time | commit |",
          "|---|---|---|---|---|---|---|---|---|"]


def write_doc(entry: dict) -> None:
    """Append the run's row to the log table of docs/results/search.md. The doc is the record of
    the whole search (the jsonl beside the runs holds the detail but is run output, and a fresh
    checkout has none), so rows are only ever added, never rebuilt from the jsonl."""
    doc = ROOT / "docs" / "results" / "search.md"
    text = doc.read_text() if doc.is_file() else ""
    if MARKER not in text:
        text = text.rstrip("\n") + f"\n\n{MARKER}\n\n" + "\n".join(HEADER) + "\n"
    row = (f"| {entry['data']} | {entry['label']} | {entry['row']} | {'<br>'.join(entry['overrides']) or '(none)'} "
           f"| {len(entry['folds'])} | {100 * entry['test_score']:.1f} | {100 * entry['val_patient_macro_auc']:.1f} "
           f"| {entry['seconds']:.0f} s | {entry['commit'][:7]} |")
    doc.write_text(text.rstrip("\n") + "\n" + row + "\n")


if __name__ == "__main__":
    main()
