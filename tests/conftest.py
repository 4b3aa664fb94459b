"""Shared fixtures: tiny generated images and manifests, small fast model configs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breastfusion.allocator import reuse_freed_memory
from breastfusion.config import BackboneConfig, ModelConfig
from breastfusion.records import ImageRecord, write_manifest
from breastfusion.vocab import LABELS, MG_SLOTS, Modality, Side

reuse_freed_memory()  # the library runs as the command line sets it up (allocator.py)

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def requires_shared_datasets():
    """Skip with a reason outside CI; fail in CI (CI=true) when the public data is missing."""
    if SHARED_DATASETS.is_dir():
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but the public datasets are missing at {SHARED_DATASETS}")
    pytest.skip(f"public datasets not found at {SHARED_DATASETS}")


def tiny_model_config(**overrides) -> ModelConfig:
    """Paper architecture, small backbone and dimensions so a forward pass takes milliseconds."""
    cfg = ModelConfig(
        backbone=BackboneConfig(name="resnet18", weights="none", frozen="layer1", image_size=32),
        branch_dims=[64, 32], view_attention_dim=16, embedding_dim=16, head_dims=[16, 8],
        fusion_dims=[16, 8], attention_tokens=4, attention_heads=2,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def write_tiny_cohort(root: Path, n_cases: int = 30, size: int = 32, us_per_case: int = 2,
                      seed: int = 0) -> Path:
    """Random-noise PNGs for n cases (labels cycling), 4 MG slots + US images each."""
    rng = np.random.default_rng(seed)
    img_dir = root / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_cases):
        label = LABELS[i % 3]
        pid = f"P{i:03d}"
        for slot in MG_SLOTS:
            path = img_dir / f"{pid}_{slot.name}.png"
            Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)).save(path)
            records.append(ImageRecord(pid, Side.LEFT, Modality.MG, str(path), slot.view, slot.kind, label))
        for k in range(us_per_case):
            path = img_dir / f"{pid}_US{k}.png"
            Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)).save(path)
            records.append(ImageRecord(pid, Side.LEFT, Modality.US, str(path), label=label))
    return write_manifest(records, root / "manifest.csv")
