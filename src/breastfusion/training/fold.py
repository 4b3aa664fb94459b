"""One fold: train (branches first for the paper's fusion), choose the epoch on the test split,
predict the test split and the validation fold, and write the fold's files (inference/layout.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from ..choices import FusionInit, Head, TrainMode
from ..config import ModelConfig, RunConfig
from ..errors import BreastFusionError
from ..evaluation.aggregate import LOGIT_COLUMNS, PROBA_COLUMNS
from ..files import atomic_path, write_text
from ..inference import layout
from ..inference.encode import trained_part
from ..inference.instances import Instance, modality_images
from ..inference.runtime import loader_kwargs, memory_format, pick_device, tensor_to
from ..models.network import BreastFusionNet, HeadOnly, build_head, feature_dims, transfer_branch
from ..models.weights import save_weights
from .augment import Augment
from .branches import BranchMemo, only, single_modality
from .data import FeatureInstances, ImageInstances
from .distributed import Distributed
from .loop import fit, predict_logits, probabilities
from .preparation import CVData, fold_seed
from .splits import FoldSplit

log = logging.getLogger(__name__)


def run_fold(data: CVData, split: FoldSplit, cfg: RunConfig, fold_dir: Path, progress: bool = True,
             memo: BranchMemo | None = None, device: torch.device | None = None,
             dist: Distributed | None = None) -> pd.DataFrame:
    """Train one fold (branches first for the paper's fusion), predict its test split and
    validation fold, and write the fold's files (main rank only when distributed)."""
    seed = fold_seed(cfg, split.fold)
    dist = dist if dist is not None else Distributed.single(device or cfg.train.device)
    device = dist.device if dist.enabled else device if device is not None else pick_device(cfg.train.device)
    by_case: dict[str, list[Instance]] = {}
    for inst in data.instances:
        by_case.setdefault(inst.case_id, []).append(inst)

    def part(ids):
        return [i for cid in ids for i in by_case.get(cid, [])]

    train, test, val = part(split.train), part(split.test), part(split.val)
    if dist.is_main:
        fold_dir.mkdir(parents=True, exist_ok=True)  # holds checkpoints while the fold trains
    trainer = _Trainer(cfg, data, seed, device, progress and dist.is_main, memo, dist)
    pretrained = {}
    if cfg.model.multimodal and cfg.model.fusion_init == FusionInit.BRANCHES and cfg.model.head == Head.PAPER:
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
    rows = trainer.prediction_table(model, val, split.fold)
    test_rows = trainer.prediction_table(model, test, split.fold)
    if not dist.is_main:
        return rows
    info = {"fold": split.fold, "seed": seed, "best_epoch": result.best_epoch,
            "best_test_score": result.best_score, "select_by": cfg.train.select_by,
            "n_cases": {"train": len(split.train), "test": len(split.test), "val": len(split.val)},
            "n_instances": {"train": len(train), "test": len(test), "val": len(val)},
            "resumed_after_epoch": result.resumed_after_epoch,
            "history": result.history}
    write_text(fold_dir / layout.FIT_FILE, json.dumps(info, indent=1))
    save_weights(model, fold_dir / layout.MODEL_FILE)
    with atomic_path(fold_dir / layout.TEST_PREDICTIONS_FILE) as tmp:  # for calibration and operating points
        test_rows.to_csv(tmp, index=False)
    with atomic_path(fold_dir / layout.PREDICTIONS_FILE) as tmp:  # written last: its presence marks the fold done
        rows.to_csv(tmp, index=False)
    log.info("%s fold %d: best epoch %d, test-split %s %.4f", cfg.name, split.fold, result.best_epoch,
             cfg.train.select_by, result.best_score)
    return rows


def prediction_rows(logits: np.ndarray, index: np.ndarray, items: list[Instance], fold: int) -> pd.DataFrame:
    """One row per instance: ids, label, softmax probabilities and the logits behind them."""
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



class _Trainer:
    """Builds models and loaders for one fold, in fine-tune or cached-feature mode."""

    def __init__(self, cfg: RunConfig, data: CVData, seed: int, device: torch.device, progress: bool,
                 memo: BranchMemo | None = None, dist: Distributed | None = None):
        self.cfg, self.seed, self.device, self.progress, self.memo = cfg, seed, device, progress, memo
        self.dist = dist if dist is not None else Distributed.single(device)
        self.features, self.source = data.features, data.source
        self.augment = Augment.of(cfg.train)

    def loader(self, items: list[Instance], train: bool, features: dict[str, np.ndarray] | None = None
               ) -> DataLoader:
        """Batches of `items`: images, cached features or activations as the mode says, or the
        pooled `features` given (a fusion trained on frozen branches, `frozen_branch_features`)."""
        t = self.cfg.train
        if features is not None:
            data = FeatureInstances(items, features, train, self.seed, kind="feat")
        elif t.mode in (TrainMode.CACHED, TrainMode.PARTIAL):
            kind = "feat" if t.mode == TrainMode.CACHED else "act"
            data = FeatureInstances(items, self.features, train, self.seed, kind=kind)
        else:
            data = ImageInstances(items, self.source, train, self.augment, self.seed)
        if train:
            gen = torch.Generator().manual_seed(self.seed)
            return DataLoader(data, batch_size=t.batch_size, shuffle=True, generator=gen,
                              num_workers=t.num_workers, drop_last=len(items) > t.batch_size,
                              **loader_kwargs(self.device))
        return DataLoader(data, batch_size=t.batch_size * 2, num_workers=t.num_workers,
                          **loader_kwargs(self.device))

    def prediction_table(self, model: torch.nn.Module, items: list[Instance], fold: int) -> pd.DataFrame:
        """`items` predicted as training evaluated them (same precision and layout; sharded
        over the ranks when distributed)."""
        t = self.cfg.train
        logits, index = predict_logits(model, self.loader(items, False), self.device, precision=t.precision,
                                       channels_last=t.channels_last, dist=self.dist)
        return prediction_rows(logits, index, items, fold)

    @torch.no_grad()
    def frozen_branch_features(self, model: BreastFusionNet, items: list[Instance], images: int = 32
                               ) -> dict[str, np.ndarray]:
        """Partial mode, fusion on frozen branches: every image's cached activation copies through
        its branch's later stages (held, eval mode) and pooling, as the fusion's forward pass would
        compute them (same precision and memory layout). path -> (1 + copies, D) float32."""
        t = self.cfg.train
        out: dict[str, np.ndarray] = {}
        was_training = model.training
        model.eval()
        with memory_format(model, t.channels_last) as cl:
            for modality in model.head.modalities:
                paths = sorted(r.path for r in modality_images(items, modality))
                backbone = model.backbone(modality)
                for start in range(0, len(paths), images):
                    chunk = paths[start:start + images]
                    acts = [np.asarray(self.features[p], dtype=np.float32) for p in chunk]
                    x = tensor_to(torch.from_numpy(np.concatenate(acts)), self.device, cl)
                    with trained_part(self.device, t):
                        pooled = backbone.tail(x).float().cpu().numpy()
                    for p, rows in zip(chunk, np.split(pooled, np.cumsum([len(a) for a in acts])[:-1]),
                                       strict=True):
                        out[p] = rows
        model.train(was_training)
        return out

    def build(self, model_cfg: ModelConfig) -> torch.nn.Module:
        torch.manual_seed(self.seed)
        if self.cfg.train.mode == TrainMode.CACHED:
            return HeadOnly(build_head(model_cfg, feature_dims(model_cfg)))
        return BreastFusionNet(model_cfg)  # partial mode too: the later stages train on activations

    def train(self, model_cfg: ModelConfig, train: list[Instance], test: list[Instance], desc: str,
              branches: dict | None = None, checkpoint: Path | None = None):
        model = self.build(model_cfg)
        key = None
        if self.memo is not None and not model_cfg.multimodal:
            canonical = single_modality(model_cfg, model_cfg.modality_set[0])
            key = self.memo.key(self.cfg, canonical, self.seed, train, test)
            result = self.memo.load(key, model) if self.dist.is_main else None
            if self.dist.broadcast_object(result is not None):  # the main rank decides for all
                result = result or self.memo.load(key, model)
                if result is None:
                    raise BreastFusionError(f"shared branch {key} is readable by the main rank only: "
                                            "put the run folder on a file system every node shares")
                return model.to(self.device), result
        for modality, source in (branches or {}).items():
            transfer_branch(source, model, modality, freeze=model_cfg.freeze_branches)
        model = model.to(self.device)
        feats = None
        if self.cfg.train.mode == TrainMode.PARTIAL and model_cfg.freeze_branches and branches \
                and set(branches) >= set(model_cfg.modality_set):
            # the branches are held as trained: their pooled features are fixed, computed once
            # per image and copy instead of once per epoch, and only the fusion trains on them
            feats = self.frozen_branch_features(model, train + test)
        result = fit(model, self.loader(train, True, feats), self.loader(test, False, feats), self.cfg.train,
                     model_cfg.arcface_loss_weight, self.device, progress=self.progress, desc=desc,
                     checkpoint=checkpoint, dist=self.dist)
        if key is not None and self.dist.is_main:
            self.memo.save(key, model, result)
        return model, result
