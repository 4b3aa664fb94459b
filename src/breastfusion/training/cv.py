"""Patient-level stratified k-fold cross-validation of one configuration.

For each fold: train on the train split, choose the best epoch on the test
split, predict the validation fold. Writes per fold
``folds/fold_K/predictions.csv`` (validation instances) and ``fit.json``; a
fold whose predictions exist is not rerun (resumable).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import ModelConfig, RunConfig, to_dict
from ..errors import BreastFusionError, CohortError, InputImageError, WeightsError
from ..evaluation.aggregate import LOGIT_COLUMNS, PROBA_COLUMNS
from ..files import atomic_path, write_text
from ..models.network import BreastFusionNet, HeadOnly, build_head, transfer_branch
from ..models.weights import load_into, save_weights
from ..preprocess.pipeline import PreprocessCache, Preprocessor
from ..records import ImageRecord, Manifest
from ..vocab import Modality
from .augment import Augment
from .data import FeatureInstances, ImageInstances
from .features import FeatureStore
from .instances import Instance, build_instances
from .loop import FitResult, fit, pick_device, predict_logits, probabilities
from .splits import FoldSplit, assign_folds, make_splits

log = logging.getLogger(__name__)


@dataclass
class CVData:
    """Everything a CV run needs that does not depend on the fold."""

    instances: list[Instance]
    splits: list[FoldSplit]
    skipped: Counter  # cases left out, by reason
    source: PreprocessCache  # preprocessed images (shared by every fold)
    failed: dict[str, str] = field(default_factory=dict)  # image path -> why preprocessing refused it
    features: dict[str, np.ndarray] | None = None  # cached mode: path -> (1 + copies, D)


def image_source(cfg: RunConfig, cache_dir: str | os.PathLike | None = None) -> PreprocessCache:
    """The preprocessed images a config's model sees (cached in `cache_dir`, default the config's)."""
    p = cfg.preprocess
    pre = Preprocessor(size=cfg.model.backbone.image_size, enabled=p.enabled, chest_wall=p.chest_wall,
                       colour=p.colour)
    return PreprocessCache(cache_dir or cfg.train.cache_dir, pre)


def prepare(manifest: Manifest, cfg: RunConfig, progress: bool = True) -> CVData:
    """Instances, preprocessing (and features in cached mode) of every image, then folds."""
    cases = [c for c in manifest.cases().values()]
    unlabeled = [c.case_id for c in cases if c.label is None]
    if unlabeled:
        raise BreastFusionError(f"cross-validation needs labels; {len(unlabeled)} case(s) have none "
                                f"(first: {unlabeled[0]})")
    instances, skipped = build_instances(cases, cfg.model.modality_set, cfg.model.slots)
    records = list({r.path: r for i in instances for r in (*i.mg, i.us) if r is not None}.values())
    source = image_source(cfg)
    features = None
    if cfg.train.mode == "cached":
        store = FeatureStore(cfg.train.cache_dir, cfg.model.backbone, source,
                             Augment(cfg.train.hflip_p, cfg.train.rotation_deg), cfg.train.feature_copies,
                             cfg.train.seed)
        features = store.features(records, device=pick_device(cfg.train.device), progress=progress)
        failed = store.failed
    else:
        failed = screen(records, source, progress)
    instances = without_failed(instances, failed, skipped)
    if not instances:
        raise CohortError(f"config {cfg.name!r}: no case has the images this model needs ({dict(skipped)})")
    used = {i.case_id for i in instances}
    kept = [c for c in cases if c.case_id in used]
    fold_of = assign_folds([c.case_id for c in kept], [c.label.index for c in kept],
                           [c.group for c in kept], cfg.cv.folds, cfg.cv.seed)
    splits = make_splits(fold_of, cfg.cv.folds, cfg.cv.test_folds)
    return CVData(instances, splits, skipped, source, failed, features)


def screen(records: list[ImageRecord], source: PreprocessCache, progress: bool = True) -> dict[str, str]:
    """Preprocess every image once (filling the cache); return the refused ones with their reasons."""
    failed = {}
    for rec in tqdm(records, desc="preprocess", unit="img", disable=not progress, leave=False):
        try:
            source.get(rec.path, rec.modality, rec.side)
        except InputImageError as exc:
            failed[rec.path] = str(exc)
    return failed


def without_failed(instances: list[Instance], failed: dict[str, str], skipped: Counter) -> list[Instance]:
    """Drop instances whose US image was refused; mask refused MG views (drop if none is left)."""
    if not failed:
        return instances
    out = []
    for inst in instances:
        if inst.us is not None and inst.us.path in failed:
            skipped["instance: US image refused by preprocessing"] += 1
            continue
        mg = tuple(None if r is not None and r.path in failed else r for r in inst.mg)
        if inst.mg and not any(mg):
            skipped["instance: every MG image refused by preprocessing"] += 1
            continue
        out.append(dataclasses.replace(inst, mg=mg))
    return out


def fold_seed(cfg: RunConfig, fold: int) -> int:
    return cfg.train.seed * 1000 + fold


@dataclass
class CVResult:
    predictions: pd.DataFrame  # validation instances of every fold
    data: CVData


def cross_validate(manifest: Manifest, cfg: RunConfig, out_dir: str | os.PathLike,
                   progress: bool = True, memo: BranchMemo | None = None) -> CVResult:
    """Run (or resume) all folds; return the validation instance predictions of every fold.

    ``memo`` (optional) shares trained single-modality networks between the rows of an
    experiment (see BranchMemo)."""
    cfg.validate()
    out_dir = Path(out_dir)
    data = prepare(manifest, cfg, progress)
    if data.failed:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "refused_images.json", json.dumps(data.failed, indent=1))
    frames = []
    for split in data.splits:
        fold_dir = out_dir / "folds" / f"fold_{split.fold}"
        done = fold_dir / "predictions.csv"
        if not done.is_file():
            run_fold(data, split, cfg, fold_dir, progress, memo)
        frames.append(pd.read_csv(done))
    return CVResult(pd.concat(frames, ignore_index=True), data)


def run_fold(data: CVData, split: FoldSplit, cfg: RunConfig, fold_dir: Path, progress: bool = True,
             memo: BranchMemo | None = None) -> pd.DataFrame:
    seed = fold_seed(cfg, split.fold)
    device = pick_device(cfg.train.device)
    by_case: dict[str, list[Instance]] = {}
    for inst in data.instances:
        by_case.setdefault(inst.case_id, []).append(inst)

    def part(ids):
        return [i for cid in ids for i in by_case.get(cid, [])]

    train, test, val = part(split.train), part(split.test), part(split.val)
    fold_dir.mkdir(parents=True, exist_ok=True)  # holds checkpoints while the fold trains
    trainer = _Trainer(cfg, data, seed, device, progress, memo)
    pretrained = {}
    if cfg.model.multimodal and cfg.model.fusion_init == "branches" and cfg.model.head == "paper":
        # The paper's fusion: single-modality networks trained first (same fold, same
        # splits) serve as feature extractors for the fusion layers.
        for modality in cfg.model.modality_set:
            single = single_modality(cfg.model, modality)
            model, _ = trainer.train(single, *(only(items, modality) for items in (train, test)),
                                     desc=f"{cfg.name} fold {split.fold} {modality.value} branch",
                                     checkpoint=fold_dir / f"checkpoint_{modality.value}.pt")
            pretrained[modality] = model
    model, result = trainer.train(cfg.model, train, test, desc=f"{cfg.name} fold {split.fold}",
                                  branches=pretrained, checkpoint=fold_dir / "checkpoint.pt")
    rows = _prediction_table(model, trainer.loader(val, False), val, split.fold, device)
    test_rows = _prediction_table(model, trainer.loader(test, False), test, split.fold, device)
    info = {"fold": split.fold, "seed": seed, "best_epoch": result.best_epoch,
            "best_test_score": result.best_score, "select_by": cfg.train.select_by,
            "n_cases": {"train": len(split.train), "test": len(split.test), "val": len(split.val)},
            "n_instances": {"train": len(train), "test": len(test), "val": len(val)},
            "resumed_after_epoch": result.resumed_after_epoch,
            "history": result.history}
    write_text(fold_dir / "fit.json", json.dumps(info, indent=1))
    save_weights(model, fold_dir / MODEL_FILE)
    with atomic_path(fold_dir / "test_predictions.csv") as tmp:  # for calibration and operating points
        test_rows.to_csv(tmp, index=False)
    with atomic_path(fold_dir / "predictions.csv") as tmp:  # written last: its presence marks the fold done
        rows.to_csv(tmp, index=False)
    return rows


MODEL_FILE = "model.safetensors"


def _prediction_table(model, loader: DataLoader, items: list[Instance], fold: int, device) -> pd.DataFrame:
    """One row per instance: ids, label, softmax probabilities and the logits behind them."""
    logits, index = predict_logits(model, loader, device)
    table = pd.DataFrame({
        "fold": fold,
        "instance_id": [items[i].instance_id for i in index],
        "case_id": [items[i].case_id for i in index],
        "group": [items[i].group for i in index],
        "label": [items[i].label.index for i in index],
    })
    table[PROBA_COLUMNS] = probabilities(logits)
    table[LOGIT_COLUMNS] = logits
    return table


# Fields that only shape the fusion of two modalities: a single-modality network does not
# depend on them, so they are reset to their defaults in its config.
FUSION_ONLY_FIELDS = ("fusion", "fusion_init", "freeze_branches", "fusion_dims", "attention_heads",
                      "attention_tokens", "l2_normalize")


def single_modality(model_cfg: ModelConfig, modality: Modality) -> ModelConfig:
    """The config of the single-modality network inside a multimodal one, in canonical form
    (fusion-only fields at their defaults; MG slots dropped for US), so that every row that
    needs the same network names it the same way (see BranchMemo)."""
    default = ModelConfig()
    reset = {name: getattr(default, name) for name in FUSION_ONLY_FIELDS}
    if modality is Modality.US:
        reset["mg_slots"] = default.mg_slots
    return dataclasses.replace(model_cfg, modalities=[modality.value], **reset)


def only(instances: list[Instance], modality: Modality) -> list[Instance]:
    """The single-modality instances hidden in multimodal ones (MG: one per case)."""
    if modality is Modality.US:
        return [dataclasses.replace(i, mg=()) for i in instances]
    seen, out = set(), []
    for inst in instances:
        if inst.case_id not in seen:
            seen.add(inst.case_id)
            out.append(dataclasses.replace(inst, us=None, instance_id=f"{inst.case_id}#MG"))
    return out


class BranchMemo:
    """Trained single-modality networks shared by the rows of one experiment.

    In Table 3 every MM row trains its US and MG networks first (same fold, same
    splits), and the single-modality rows train the very same networks. Training is
    a deterministic function of (model config, training config, preprocessing, seed,
    ordered train and test instances), so a network with the same key is the same
    network: it is trained once and loaded by every row that needs it. The key holds
    the instance order too, so a hit changes no result, only the time.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def key(self, cfg: RunConfig, model_cfg: ModelConfig, seed: int, train: list[Instance],
            test: list[Instance]) -> str:
        train_cfg = {k: v for k, v in to_dict(cfg.train).items() if k != "checkpoint_seconds"}  # changes no number
        payload = {"model": to_dict(model_cfg), "train": train_cfg, "preprocess": to_dict(cfg.preprocess),
                   "seed": seed, "train_ids": [i.instance_id for i in train],
                   "test_ids": [i.instance_id for i in test]}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]

    def load(self, key: str, model: torch.nn.Module) -> FitResult | None:
        weights, info = self.root / f"{key}.safetensors", self.root / f"{key}.json"
        if not (weights.is_file() and info.is_file()):
            return None
        try:
            load_into(model, weights)
            return FitResult(**json.loads(info.read_text()))
        except (WeightsError, ValueError, TypeError) as exc:  # a corrupt entry: train again
            log.warning("%s: unusable shared branch (%s); training it again", weights.name, exc)
            return None

    def save(self, key: str, model: torch.nn.Module, result: FitResult) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        save_weights(model, self.root / f"{key}.safetensors")
        write_text(self.root / f"{key}.json", json.dumps(dataclasses.asdict(result)))  # written last: marks done


class _Trainer:
    """Builds models and loaders for one fold, in fine-tune or cached-feature mode."""

    def __init__(self, cfg: RunConfig, data: CVData, seed: int, device: torch.device, progress: bool,
                 memo: BranchMemo | None = None):
        self.cfg, self.seed, self.device, self.progress, self.memo = cfg, seed, device, progress, memo
        self.features, self.source = data.features, data.source
        self.augment = Augment(cfg.train.hflip_p, cfg.train.rotation_deg)

    def loader(self, items: list[Instance], train: bool) -> DataLoader:
        t = self.cfg.train
        if t.mode == "cached":
            data = FeatureInstances(items, self.features, train, self.seed)
        else:
            data = ImageInstances(items, self.source, train, self.augment, self.seed)
        if train:
            gen = torch.Generator().manual_seed(self.seed)
            return DataLoader(data, batch_size=t.batch_size, shuffle=True, generator=gen,
                              num_workers=t.num_workers, drop_last=len(items) > t.batch_size)
        return DataLoader(data, batch_size=t.batch_size * 2, num_workers=t.num_workers)

    def build(self, model_cfg: ModelConfig) -> torch.nn.Module:
        torch.manual_seed(self.seed)
        if self.cfg.train.mode == "cached":
            return HeadOnly(build_head(model_cfg, next(iter(self.features.values())).shape[-1]))
        return BreastFusionNet(model_cfg)

    def train(self, model_cfg: ModelConfig, train: list[Instance], test: list[Instance], desc: str,
              branches: dict | None = None, checkpoint: Path | None = None):
        model = self.build(model_cfg)
        key = None
        if self.memo is not None and not model_cfg.multimodal:
            canonical = single_modality(model_cfg, model_cfg.modality_set[0])
            key = self.memo.key(self.cfg, canonical, self.seed, train, test)
            result = self.memo.load(key, model)
            if result is not None:
                return model.to(self.device), result
        for modality, source in (branches or {}).items():
            transfer_branch(source, model, modality, freeze=model_cfg.freeze_branches)
        model = model.to(self.device)
        result = fit(model, self.loader(train, True), self.loader(test, False), self.cfg.train,
                     model_cfg.arcface_loss_weight, self.device, progress=self.progress, desc=desc,
                     checkpoint=checkpoint)
        if key is not None:
            self.memo.save(key, model, result)
        return model, result
