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

from .. import allocator
from ..choices import FusionInit, Head, TrainMode
from ..config import ModelConfig, RunConfig, to_dict
from ..errors import BreastFusionError, CohortError, WeightsError
from ..evaluation.aggregate import LOGIT_COLUMNS, PROBA_COLUMNS
from ..files import atomic_path, write_text
from ..inference import layout
from ..inference.images import image_source, screen, without_failed
from ..inference.instances import Instance, build_instances
from ..inference.runtime import loader_kwargs, pick_device
from ..models.network import BreastFusionNet, HeadOnly, build_head, feature_dims, transfer_branch
from ..models.weights import load_into, save_weights
from ..preprocess.pipeline import ImageSource
from ..records import ImageRecord, Manifest
from ..vocab import Modality
from .augment import Augment
from .data import FeatureInstances, ImageInstances
from .distributed import Distributed
from .features import FeatureStore
from .loop import FitResult, fit, predict_logits, probabilities
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
    log.info("%s: %d instance(s) of %d case(s); %d image(s) refused by preprocessing; left out: %s", cfg.name,
             len(instances), len(kept), len(failed), dict(skipped) or "none")
    return CVData(instances, splits, skipped, source, failed, features)


def fold_seed(cfg: RunConfig, fold: int) -> int:
    return cfg.train.seed * 1000 + fold


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
        [s for s in data.splits if not (_fold_dir(out_dir, s) / layout.PREDICTIONS_FILE).is_file()])
    if dist.enabled:
        for split in todo:
            run_fold(data, split, cfg, _fold_dir(out_dir, split), progress, memo, dist=dist)
            dist.barrier()  # the fold's files are written before anyone reads them
    elif jobs > 1 and len(todo) > 1:
        run_folds_parallel(data, todo, cfg, out_dir, jobs, progress, memo)
    else:
        for split in todo:
            run_fold(data, split, cfg, _fold_dir(out_dir, split), progress, memo)
    frames = [pd.read_csv(_fold_dir(out_dir, s) / layout.PREDICTIONS_FILE) for s in data.splits]
    return CVResult(pd.concat(frames, ignore_index=True), data)


def _fold_dir(out_dir: Path, split: FoldSplit) -> Path:
    return layout.fold_dir(out_dir, split.fold)


def fold_devices(jobs: int) -> list[str]:
    """The device of each parallel fold job: one GPU each (round robin) when there are
    several, else all on the one GPU or the CPU."""
    n = torch.cuda.device_count()
    if n > 1:
        return [f"cuda:{k % n}" for k in range(jobs)]
    return ["cuda" if n == 1 else "cpu"] * jobs


def run_folds_parallel(data: CVData, splits: list[FoldSplit], cfg: RunConfig, out_dir: Path, jobs: int,
                       progress: bool = True, memo: BranchMemo | None = None) -> None:
    """Independent folds as separate processes (`--jobs N`): at most `jobs` at a time, each
    with its share of the CPU threads and, when several GPUs are present, its own GPU.

    Each worker process takes one device for its life (`fold_devices`), so two folds never
    share a GPU while another idles. A fold's result does not depend on which process ran it
    (its seed is the fold's, its data the same `CVData`); a failed fold raises here after the
    others have finished, and rerunning resumes as usual. `cfg.train.device` "auto" uses the
    worker's device; an explicit device is kept."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    jobs = min(jobs, len(splits))
    threads = max(1, torch.get_num_threads() // jobs)
    ctx = mp.get_context("spawn")  # never fork a process that holds torch threads
    slots = ctx.Queue()
    for device in fold_devices(jobs):
        slots.put(device if cfg.train.device == "auto" else cfg.train.device)
    errors = []
    bar = tqdm(total=len(splits), desc=f"{cfg.name} folds ({jobs} jobs)", unit="fold", disable=not progress,
               leave=False)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_fold_worker_init,
                             initargs=(slots, threads, allocator.applied())) as pool:
        futures = {pool.submit(_fold_job, data, split, cfg, _fold_dir(out_dir, split), memo): split.fold
                   for split in splits}
        for future in as_completed(futures):
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - reported after every fold has had its chance
                errors.append((futures[future], exc))
            bar.update(1)
    bar.close()
    if errors:
        fold, exc = min(errors, key=lambda e: e[0])
        raise exc if isinstance(exc, BreastFusionError) else BreastFusionError(
            f"fold {fold} failed in its worker process: {type(exc).__name__}: {exc}") from exc


_WORKER_DEVICE: str | None = None  # the device of this fold worker process (run_folds_parallel)


def _fold_worker_init(slots, threads: int, reuse_memory: bool) -> None:
    global _WORKER_DEVICE
    _WORKER_DEVICE = slots.get()
    torch.set_num_threads(threads)
    if reuse_memory:  # as the parent process does (a spawned process starts with glibc's defaults)
        allocator.reuse_freed_memory()


def _fold_job(data: CVData, split: FoldSplit, cfg: RunConfig, fold_dir: Path, memo: BranchMemo | None) -> None:
    run_fold(data, split, cfg, fold_dir, progress=False, memo=memo, device=torch.device(_WORKER_DEVICE))


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



def _prediction_table(logits: np.ndarray, index: np.ndarray, items: list[Instance], fold: int) -> pd.DataFrame:
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


# Training settings that change no number (the memo key leaves them out).
NUMBER_NEUTRAL = ("checkpoint_seconds", "num_workers")

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
        train_cfg = {k: v for k, v in to_dict(cfg.train).items() if k not in NUMBER_NEUTRAL}
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
        """Store a trained network (call on the main rank only)."""
        self.root.mkdir(parents=True, exist_ok=True)
        save_weights(model, self.root / f"{key}.safetensors")
        write_text(self.root / f"{key}.json", json.dumps(dataclasses.asdict(result)))  # written last: marks done


class _Trainer:
    """Builds models and loaders for one fold, in fine-tune or cached-feature mode."""

    def __init__(self, cfg: RunConfig, data: CVData, seed: int, device: torch.device, progress: bool,
                 memo: BranchMemo | None = None, dist: Distributed | None = None):
        self.cfg, self.seed, self.device, self.progress, self.memo = cfg, seed, device, progress, memo
        self.dist = dist if dist is not None else Distributed.single(device)
        self.features, self.source = data.features, data.source
        self.augment = Augment.of(cfg.train)

    def loader(self, items: list[Instance], train: bool) -> DataLoader:
        t = self.cfg.train
        if t.mode in (TrainMode.CACHED, TrainMode.PARTIAL):
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
        return _prediction_table(logits, index, items, fold)

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
        result = fit(model, self.loader(train, True), self.loader(test, False), self.cfg.train,
                     model_cfg.arcface_loss_weight, self.device, progress=self.progress, desc=desc,
                     checkpoint=checkpoint, dist=self.dist)
        if key is not None and self.dist.is_main:
            self.memo.save(key, model, result)
        return model, result
