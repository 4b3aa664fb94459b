"""Cached-feature mode: each image's backbone features computed once and kept on disk.

On 2 CPU cores fine-tuning a ResNet50 runs at a few images per second, so
this mode freezes the backbone, computes every image's pooled features once
(plus `copies` augmented versions, for train-time augmentation) and trains
everything after the backbone on them. The head is the same `FusionHead` that
fine-tuning trains.

On disk: ``<cache_dir>/features/<spec>/<image hash>.npy``, an array of shape
(1 + copies, D) (row 0 = the plain image). `<spec>` hashes everything the
features depend on: backbone name and weights (file content hash), image
spec, augmentation and copy count. `<image hash>` is the file's content hash,
so a renamed or moved file is not recomputed and a changed one is.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import BackboneConfig
from ..models.backbones import Backbone, imagenet_weights_path
from ..preprocess.images import ImageSpec, load_image
from .augment import Augment
from .data import item_rng


def file_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def weights_id(cfg: BackboneConfig) -> str:
    if cfg.weights in ("none", ""):
        return "none"
    path = imagenet_weights_path(cfg.name) if cfg.weights == "imagenet" else Path(cfg.weights)
    return file_hash(path)[:16]


class FeatureStore:
    def __init__(self, cache_dir: str | os.PathLike, backbone_cfg: BackboneConfig, spec: ImageSpec,
                 augment: Augment, copies: int, seed: int = 0):
        self.backbone_cfg, self.spec, self.augment, self.copies, self.seed = (
            backbone_cfg, spec, augment, copies, seed)
        self.key = {
            "backbone": backbone_cfg.name,
            "weights": weights_id(backbone_cfg),
            "image": spec.key(),
            "augment": augment.key(),
            "copies": copies,
            "seed": seed,
            "format": 1,
        }
        spec_hash = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = Path(cache_dir) / "features" / spec_hash
        self.computed = 0  # images whose features this store computed (not read from disk)

    def _file(self, content_hash: str) -> Path:
        return self.dir / f"{content_hash[:32]}.npy"

    def features(self, paths: Sequence[str], backbone: Backbone | None = None, batch_size: int = 32,
                 device: torch.device | str = "cpu", progress: bool = True) -> dict[str, np.ndarray]:
        """path -> (1 + copies, D) float32 array; computes what the disk cache lacks."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "key.json").write_text(json.dumps(self.key, indent=1))
        unique = list(dict.fromkeys(paths))
        hashes = {p: file_hash(p) for p in unique}
        missing = [p for p in unique if not self._file(hashes[p]).is_file()]
        if missing:
            if backbone is None:
                from ..models.backbones import build_backbone

                backbone = build_backbone(self.backbone_cfg)
            self._compute(missing, hashes, backbone, batch_size, device, progress)
        return {p: np.load(self._file(hashes[p])) for p in unique}

    @torch.no_grad()
    def _compute(self, paths, hashes, backbone: Backbone, batch_size, device, progress) -> None:
        backbone = backbone.to(device).eval()
        jobs = [(p, c) for p in paths for c in range(1 + self.copies)]
        rows: dict[str, list[np.ndarray | None]] = {p: [None] * (1 + self.copies) for p in paths}
        bar = tqdm(total=len(jobs), desc=f"features {self.backbone_cfg.name}", unit="img",
                   disable=not progress, leave=False)
        plain: dict[str, torch.Tensor] = {}
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            images = []
            for path, copy in chunk:
                if path not in plain:
                    plain[path] = torch.from_numpy(load_image(path, self.spec)).unsqueeze(0)
                img = plain[path]
                if copy:
                    img = self.augment(img, item_rng(self.seed, copy, 0, hashes[path]))
                images.append(img)
            feats = backbone(torch.stack(images).to(device)).float().cpu().numpy()
            for (path, copy), f in zip(chunk, feats, strict=True):
                rows[path][copy] = f
                if all(r is not None for r in rows[path]):
                    _save_atomic(self._file(hashes[path]), np.stack(rows[path]))
                    plain.pop(path, None)
                    self.computed += 1
            bar.update(len(chunk))
        bar.close()


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array.astype(np.float32))
    os.replace(tmp, path)
