"""Patient-level stratified k-fold cross-validation of one configuration.

For each fold: train on the train split, choose the best epoch on the test
split, predict the validation fold. Writes per fold
``folds/fold_K/predictions.csv`` (validation instances) and ``fit.json``; a
fold whose predictions exist is not rerun (resumable).

The stages live in their own modules: preparation.py (instances, preprocessing, cached
features, folds), fold.py (one fold's training and predictions), execution.py (sequential,
process pool or DDP), branches.py (single-modality networks shared between rows).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..config import RunConfig
from ..files import write_text
from ..inference import layout
from ..records import Manifest
from .branches import BranchMemo
from .distributed import Distributed
from .execution import run_folds
from .preparation import CVData, prepare


@dataclass
class CVResult:
    predictions: pd.DataFrame  # validation instances of every fold
    data: CVData


def cross_validate(manifest: Manifest, cfg: RunConfig, out_dir: str | os.PathLike,
                   progress: bool = True, memo: BranchMemo | None = None, jobs: int = 1,
                   dist: Distributed | None = None) -> CVResult:
    """Run (or resume) all folds; return the validation instance predictions of every fold.

    ``memo`` (optional) shares trained single-modality networks between the rows of an
    experiment (see BranchMemo). ``jobs`` > 1 trains that many folds at once, each in its
    own process (see `run_folds_parallel`); the results are those of ``jobs=1``. With an
    enabled ``dist`` (torchrun; call on every rank) each fold is trained by all ranks together
    (DistributedDataParallel, see distributed.py); the main rank fills the caches first and
    alone writes files, and the others read them."""
    cfg.validate()
    dist = dist if dist is not None else Distributed.single(cfg.train.device)
    out_dir = Path(out_dir)
    if not dist.is_main:
        dist.barrier()  # the main rank preprocesses and extracts features first ...
    data = prepare(manifest, cfg, progress and dist.is_main)
    if dist.is_main:
        dist.barrier()  # ... then the other ranks read them from the caches
    if data.failed and dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "refused_images.json", json.dumps(data.failed, indent=1))
    todo = dist.broadcast_object(  # the main rank's view of what is done
        [s for s in data.splits if not layout.fold_done(out_dir, s.fold)])
    run_folds(data, todo, cfg, out_dir, progress, memo, jobs, dist)
    frames = [pd.read_csv(layout.fold_dir(out_dir, s.fold) / layout.PREDICTIONS_FILE) for s in data.splits]
    return CVResult(pd.concat(frames, ignore_index=True), data)
