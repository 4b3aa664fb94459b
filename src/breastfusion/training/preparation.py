"""Fold preparation: everything a cross-validation needs that does not depend on the fold.

Instances of every case, the preprocessing of every image (refused ones set aside), the cached
features (cached mode) or frozen-stage activations (partial mode), and the patient folds.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from ..choices import TrainMode
from ..config import RunConfig
from ..errors import BreastFusionError, CohortError
from ..inference.images import Screening, image_source, noted, screen, without_failed
from ..inference.instances import Instance, build_instances
from ..inference.runtime import pick_device
from ..preprocess.pipeline import ImageSource
from ..records import ImageRecord, Manifest
from .augment import Augment
from .features import FeatureStore
from .splits import FoldSplit, assign_folds, make_splits

log = logging.getLogger(__name__)


@dataclass
class CVData:
    """Everything a CV run needs that does not depend on the fold."""

    instances: list[Instance]
    splits: list[FoldSplit]
    skipped: Counter  # cases left out, by reason
    source: ImageSource  # preprocessed images (shared by every fold)
    failed: dict[str, str] = field(default_factory=dict)  # image path -> why preprocessing refused it
    # cached mode: path -> (1 + copies, D) features; partial mode: path -> (1 + copies, C, H, W) activations
    features: dict[str, np.ndarray] | None = None
    notes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # image path -> preprocessing notes

    def note_counts(self) -> dict[str, int]:
        """Images of the instances per preprocessing note (whole image kept, colour greyed, ...)."""
        used = {r.path for i in self.instances for r in (*i.mg, i.us) if r is not None}
        return Screening(notes={p: n for p, n in self.notes.items() if p in used}).counts()


def stored_representations(cfg: RunConfig, source: ImageSource, records: list[ImageRecord],
                           progress: bool = True, device: torch.device | None = None
                           ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Cached mode: every image's pooled backbone features; partial mode: its activation maps
    after the frozen stages. Computed once per modality's backbone and kept on disk (features.py).
    Returns (path -> array, refused path -> reason)."""
    t = cfg.train
    out: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    for modality, bb in cfg.model.backbones().items():
        mine = [r for r in records if r.modality is modality]
        if not mine:
            continue
        stage = None if t.mode == TrainMode.CACHED else bb.frozen  # pooled features, or the frozen stages' maps
        store = FeatureStore(t.cache_dir, bb, source.cache(modality), Augment.of(t), t.feature_copies, t.seed,
                             channels_last=t.channels_last, stage=stage, dtype=t.activation_dtype)
        out.update(store.features(mine, device=device or pick_device(t.device), progress=progress))
        failed.update(store.failed)
    return out, failed


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
    if cfg.train.mode in (TrainMode.CACHED, TrainMode.PARTIAL):
        features, failed = stored_representations(cfg, source, records, progress)
        notes = noted([r for r in records if r.path not in failed], source)
    else:
        screening = screen(records, source, progress)
        failed, notes = screening.refused, screening.notes
    instances = without_failed(instances, failed, skipped)
    if not instances:
        raise CohortError(f"config {cfg.name!r}: no case has the images this model needs ({dict(skipped)})")
    used = {i.case_id for i in instances}
    kept = [c for c in cases if c.case_id in used]
    fold_of = assign_folds([c.case_id for c in kept], [c.label.index for c in kept],
                           [c.group for c in kept], cfg.cv.folds, cfg.cv.seed)
    splits = make_splits(fold_of, cfg.cv.folds, cfg.cv.test_folds)
    log.info("%s: %d instance(s) of %d case(s); %d image(s) refused by preprocessing; left out: %s", cfg.name,
             len(instances), len(kept), len(failed), dict(skipped) or "none")
    return CVData(instances, splits, skipped, source, failed, features, notes)


def fold_seed(cfg: RunConfig, fold: int) -> int:
    return cfg.train.seed * 1000 + fold
