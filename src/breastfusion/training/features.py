"""Cached-feature and partial mode: what a frozen backbone makes of each image, computed once
and kept on disk.

On 2 CPU cores fine-tuning a ResNet50 runs at a few images per second, so
this mode freezes the backbone, computes every image's pooled features once
(plus `copies` augmented versions, for train-time augmentation) and trains
everything after the backbone on them. The head is the same `FusionHead` that
fine-tuning trains.

On disk: ``<cache_dir>/features/<spec>/<image hash>.npy``, an array of shape
(1 + copies, D) (row 0 = the plain image). `<spec>` hashes everything the
features depend on: backbone name and weights (file content hash), image
preprocessing, augmentation and copy count. `<image hash>` is the file's
content hash (plus modality and side, which change the preprocessing), so a
renamed or moved file is not recomputed and a changed one is. Images are read
through the preprocessing cache. An image that preprocessing refuses (e.g. a
Doppler image under the "reject" policy) gets no features; its reason is kept
in `FeatureStore.failed`.

Partial mode (`stage` set): not the pooled features but the activation maps after
the frozen stages (`Backbone.trunk`), shape (1 + copies, C, H, W), stored in
`dtype` (fp16 by default: half the disk and memory; the later stages train on
them and compute in fp32). The stage and the storage type are part of `<spec>`.
They are `StoredArray`s: read from disk when a batch indexes them, with no memory map
left open, so a large cohort's activations take no resident memory between batches
(the operating system's page cache still keeps the files it has room for).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..choices import ActivationDtype, FeatureLayer, FrozenStage, Pooling, Weights
from ..config import BackboneConfig
from ..errors import InputImageError, WeightsError
from ..files import save_npy, sha256_file, write_text
from ..inference.encode import stored_features
from ..inference.runtime import memory_format, tensor_to
from ..models.backbones import Backbone, build_backbone, imagenet_weights_path
from ..preprocess.pipeline import PreprocessCache
from ..records import ImageRecord
from .augment import Augment
from .data import item_rng

log = logging.getLogger(__name__)


def weights_id(cfg: BackboneConfig) -> str:
    if cfg.weights in (Weights.NONE, ""):
        return "none"
    path = imagenet_weights_path(cfg.name) if cfg.weights == Weights.IMAGENET else Path(cfg.weights)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found (model.backbone.weights)")
    return sha256_file(path)[:16]


# A forward pass holds every layer's activations of its images: `batch_size` images of 224 px
# (ImageNet's size) bound its memory, and larger images go through fewer at a time. (Lite2 at
# 512 px, 32 images: 3.5 GB peak; 8 images: 1.4 GB. The features do not depend on the batch.)
REFERENCE_SIDE = 224


def images_per_pass(batch_size: int, image_size: int) -> int:
    """How many images of `image_size` px one backbone pass takes: as many pixels as
    `batch_size` images of 224 px, at least one, never more than `batch_size`."""
    return max(1, min(batch_size, int(batch_size * (REFERENCE_SIDE / image_size) ** 2)))


class StoredArray:
    """An activation array in the cache, read when indexed (`a[k]`, `np.asarray(a)`). Each read
    maps the file and unmaps it again: a map held open would count every page a training epoch
    touched as this process's memory for as long as it lives (2.4 GB for CDD-CESM's Lite2
    512 px maps, once more for every row that prepared them again)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype):
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        mapped = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return np.array(mapped[index])  # a copy: the map closes when `mapped` goes

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """NumPy's protocol: the array is read from disk, so there is no view to give; with
        copy=False (never copy) that is an error, as NumPy asks of such objects."""
        if copy is False:
            raise ValueError(f"{self.path}: a stored array is read from disk; it cannot be had without a copy")
        whole = self[...]
        return whole if dtype is None else whole.astype(dtype, copy=False)


class FeatureStore:
    def __init__(self, cache_dir: str | os.PathLike, backbone_cfg: BackboneConfig, source: PreprocessCache,
                 augment: Augment, copies: int, seed: int = 0, channels_last: bool = False,
                 stage: str | None = None, dtype: str = "fp16"):
        self.backbone_cfg, self.source, self.augment, self.copies, self.seed = (
            backbone_cfg, source, augment, copies, seed)
        self.channels_last = channels_last
        self.stage = stage
        self.dtype = np.float16 if stage is not None and dtype == ActivationDtype.FP16 else np.float32  # pooled: fp32
        self.failed: dict[str, str] = {}  # path -> why preprocessing refused it
        self.key = {
            "backbone": backbone_cfg.name,
            "weights": weights_id(backbone_cfg),
            "image": source.preprocessor.key(),
            "augment": augment.key(),
            "copies": copies,
            "seed": seed,
            "format": 1,
        }
        if channels_last:  # another float summation order: other (equally valid) features
            self.key["layout"] = "channels_last"
        if backbone_cfg.pooling != Pooling.AVG:  # (keys of average-pooled features stay as they were)
            self.key["pooling"] = [backbone_cfg.pooling, backbone_cfg.gem_p]
        if stage is not None:
            self.key.update(stage=stage, dtype=np.dtype(self.dtype).name)
            self.key.pop("pooling", None)  # activations come before the pooling
        if backbone_cfg.feature_layer != FeatureLayer.HEAD and stage in (None, FrozenStage.ALL):
            self.key["feature_layer"] = backbone_cfg.feature_layer  # (activations of earlier stages share theirs)
        spec_hash = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(cache_dir) / "features" / spec_hash
        self.computed = 0  # images whose features this store computed (not read from disk)

    def _file(self, rec: ImageRecord) -> Path:
        return self.dir / self.source.file_for(rec.path, rec.modality, rec.side).name

    def features(self, records: Sequence[ImageRecord], backbone: Backbone | None = None, batch_size: int = 32,
                 device: torch.device | str = "cpu", progress: bool = True) -> dict[str, np.ndarray]:
        """path -> (1 + copies, D) float32 array (partial mode: (1 + copies, C, H, W) activations,
        a StoredArray) for every record preprocessing accepts."""
        write_text(self.dir / "key.json", json.dumps(self.key, indent=1))  # atomic: caches are shared
        unique = []
        for rec in {r.path: r for r in records}.values():
            try:
                self._file(rec)  # hashes the file: fails for a file gone since the manifest was read
                unique.append(rec)
            except InputImageError as exc:
                self.failed[rec.path] = str(exc)
        loaded = {r.path: self._load(r) for r in unique if self._file(r).is_file()}
        missing = [r for r in unique if loaded.get(r.path) is None]
        log.info("%s %s: %d image(s) read from the cache, %d to compute", self.backbone_cfg.name,
                 "features" if self.stage is None else f"activations to {self.stage}", len(unique) - len(missing),
                 len(missing))
        if missing:
            if backbone is None:
                backbone = build_backbone(self.backbone_cfg)  # pooling and frozen stages as configured
            self._compute(missing, backbone, batch_size, device, progress)
            for rec in missing:
                if rec.path not in self.failed:
                    loaded[rec.path] = self._load(rec)
                    if loaded[rec.path] is None:
                        self.failed[rec.path] = "the backbone gave non-finite features for this image"
        return {r.path: loaded[r.path] for r in unique if r.path not in self.failed}  # refused: self.failed

    def _load(self, rec: ImageRecord) -> np.ndarray | StoredArray | None:
        """A cached feature array, or None when it is unreadable, of the wrong shape or not
        finite (a corrupt cache file is recomputed, never trained on)."""
        file = self._file(rec)
        try:
            arr = np.load(file, allow_pickle=False, mmap_mode="r" if self.stage is not None else None)
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable cached features (%s); recomputing", file.name, exc)
            return None
        ndim = 2 if self.stage is None else 4
        if arr.ndim != ndim or arr.shape[0] != 1 + self.copies or arr.dtype != self.dtype \
                or not np.isfinite(arr).all():
            log.warning("%s: cached features of shape %s (%s) or not finite; recomputing", file.name, arr.shape,
                        arr.dtype)
            return None
        return arr if self.stage is None else StoredArray(file, arr.shape, arr.dtype)

    @torch.no_grad()
    def _compute(self, records: list[ImageRecord], backbone: Backbone, batch_size, device, progress) -> None:
        """Streams the images through the backbone a batch at a time (never the whole set in memory)."""
        backbone = backbone.to(device).eval()
        with memory_format(backbone, self.channels_last) as cl:
            self._compute_batches(records, backbone, batch_size, device, progress, cl)

    def _compute_batches(self, records, backbone, batch_size, device, progress, channels_last) -> None:
        per_batch = max(1, images_per_pass(batch_size, self.backbone_cfg.image_size) // (1 + self.copies))
        what = "features" if self.stage is None else f"activations to {self.stage}"
        bar = tqdm(total=len(records), desc=f"{what} {self.backbone_cfg.name}", unit="img",
                   disable=not progress, leave=False)
        for start in range(0, len(records), per_batch):
            images, owners = [], []
            for rec in records[start:start + per_batch]:
                try:
                    plain = torch.from_numpy(self.source.get(rec.path, rec.modality, rec.side)).unsqueeze(0)
                except InputImageError as exc:
                    self.failed[rec.path] = str(exc)
                    continue
                for copy in range(1 + self.copies):
                    rng = item_rng(self.seed, copy, 0, self._file(rec).stem)
                    images.append(self.augment(plain, rng) if copy else plain)
                owners.append(rec)
            if images:
                batch = tensor_to(torch.stack(images), torch.device(device), channels_last)
                out = stored_features(backbone, batch, self.stage)
                feats = out.cpu().numpy().astype(self.dtype, copy=False)
                for i, rec in enumerate(owners):
                    save_npy(self._file(rec), feats[i * (1 + self.copies):(i + 1) * (1 + self.copies)], self.dtype)
                    self.computed += 1
            bar.update(len(records[start:start + per_batch]))
        bar.close()
