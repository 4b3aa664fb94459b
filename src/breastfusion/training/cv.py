"""Patient-level stratified k-fold cross-validation of one configuration.

For each fold: train on the train split, choose the best epoch on the test
split, predict the validation fold. Writes per fold
``folds/fold_K/predictions.csv`` (validation instances) and ``fit.json``; a
fold whose predictions exist is not rerun (resumable).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from ..config import RunConfig
from ..errors import BreastFusionError
from ..evaluation.aggregate import PROBA_COLUMNS
from ..models.network import BreastFusionNet, FusionHead, HeadOnly
from ..preprocess.images import ImageSpec
from ..records import Manifest
from .augment import Augment
from .data import FeatureInstances, ImageInstances
from .features import FeatureStore
from .instances import Instance, build_instances
from .loop import fit, pick_device, predict_proba
from .splits import FoldSplit, assign_folds, make_splits


@dataclass
class CVData:
    """Everything a CV run needs that does not depend on the fold."""

    instances: list[Instance]
    splits: list[FoldSplit]
    skipped: Counter


def prepare(manifest: Manifest, cfg: RunConfig) -> CVData:
    cases = [c for c in manifest.cases().values()]
    unlabeled = [c.case_id for c in cases if c.label is None]
    if unlabeled:
        raise BreastFusionError(f"cross-validation needs labels; {len(unlabeled)} case(s) have none "
                                f"(first: {unlabeled[0]})")
    instances, skipped = build_instances(cases, cfg.model.modality_set, cfg.model.slots)
    if not instances:
        raise BreastFusionError(f"config {cfg.name!r}: no case has the images this model needs "
                                f"({dict(skipped)})")
    used = {i.case_id for i in instances}
    kept = [c for c in cases if c.case_id in used]
    fold_of = assign_folds([c.case_id for c in kept], [c.label.index for c in kept],
                           [c.group for c in kept], cfg.cv.folds, cfg.cv.seed)
    return CVData(instances, make_splits(fold_of, cfg.cv.folds, cfg.cv.test_folds), skipped)


def fold_seed(cfg: RunConfig, fold: int) -> int:
    return cfg.train.seed * 1000 + fold


def cross_validate(manifest: Manifest, cfg: RunConfig, out_dir: str | os.PathLike,
                   features: dict[str, np.ndarray] | None = None, progress: bool = True) -> pd.DataFrame:
    """Run (or resume) all folds; return the validation instance predictions of every fold."""
    cfg.validate()
    out_dir = Path(out_dir)
    data = prepare(manifest, cfg)
    if cfg.train.mode == "cached" and features is None:
        features = extract_features(data.instances, cfg, progress=progress)
    frames = []
    for split in data.splits:
        fold_dir = out_dir / "folds" / f"fold_{split.fold}"
        done = fold_dir / "predictions.csv"
        if not done.is_file():
            run_fold(data.instances, split, cfg, fold_dir, features, progress)
        frames.append(pd.read_csv(done))
    return pd.concat(frames, ignore_index=True)


def extract_features(instances: list[Instance], cfg: RunConfig, progress: bool = True,
                     backbone=None) -> dict[str, np.ndarray]:
    store = feature_store(cfg)
    paths = [r.path for inst in instances for r in (*inst.mg, inst.us) if r is not None]
    return store.features(paths, backbone=backbone, device=pick_device(cfg.train.device), progress=progress)


def feature_store(cfg: RunConfig) -> FeatureStore:
    t = cfg.train
    return FeatureStore(t.cache_dir, cfg.model.backbone, ImageSpec(cfg.model.backbone.image_size),
                        Augment(t.hflip_p, t.rotation_deg), t.feature_copies, t.seed)


def run_fold(instances: list[Instance], split: FoldSplit, cfg: RunConfig, fold_dir: Path,
             features: dict[str, np.ndarray] | None, progress: bool = True) -> pd.DataFrame:
    seed = fold_seed(cfg, split.fold)
    torch.manual_seed(seed)
    device = pick_device(cfg.train.device)
    by_case: dict[str, list[Instance]] = {}
    for inst in instances:
        by_case.setdefault(inst.case_id, []).append(inst)

    def part(ids):
        return [i for cid in ids for i in by_case.get(cid, [])]

    train, test, val = part(split.train), part(split.test), part(split.val)
    if cfg.train.mode == "cached":
        model = HeadOnly(FusionHead(cfg.model, next(iter(features.values())).shape[-1]))
        make = lambda items, is_train: FeatureInstances(items, features, is_train, seed)  # noqa: E731
    else:
        model = BreastFusionNet(cfg.model)
        spec = ImageSpec(cfg.model.backbone.image_size)
        augment = Augment(cfg.train.hflip_p, cfg.train.rotation_deg)
        make = lambda items, is_train: ImageInstances(items, spec, is_train, augment, seed)  # noqa: E731
    model = model.to(device)
    bs, workers = cfg.train.batch_size, cfg.train.num_workers
    gen = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(make(train, True), batch_size=bs, shuffle=True, generator=gen,
                              num_workers=workers, drop_last=len(train) > bs)
    test_loader = DataLoader(make(test, False), batch_size=bs * 2, num_workers=workers)
    val_loader = DataLoader(make(val, False), batch_size=bs * 2, num_workers=workers)
    result = fit(model, train_loader, test_loader, cfg.train, cfg.model.arcface_loss_weight, device,
                 progress=progress, desc=f"{cfg.name} fold {split.fold}")
    probs, index = predict_proba(model, val_loader, device)
    rows = pd.DataFrame({
        "fold": split.fold,
        "instance_id": [val[i].instance_id for i in index],
        "case_id": [val[i].case_id for i in index],
        "group": [val[i].group for i in index],
        "label": [val[i].label.index for i in index],
    })
    rows[PROBA_COLUMNS] = probs
    fold_dir.mkdir(parents=True, exist_ok=True)
    info = {"fold": split.fold, "seed": seed, "best_epoch": result.best_epoch,
            "best_test_score": result.best_score, "select_by": cfg.train.select_by,
            "n_cases": {"train": len(split.train), "test": len(split.test), "val": len(split.val)},
            "n_instances": {"train": len(train), "test": len(test), "val": len(val)},
            "history": result.history}
    _write_atomic(fold_dir / "fit.json", json.dumps(info, indent=1))
    tmp = fold_dir / "predictions.csv.tmp"
    rows.to_csv(tmp, index=False)
    os.replace(tmp, fold_dir / "predictions.csv")
    return rows


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
