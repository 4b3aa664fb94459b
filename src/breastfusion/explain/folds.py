"""Localisation of a cross-validated row on annotated data.

Every annotated validation image is explained by the fold network that did
NOT see it in training (the same out-of-fold discipline as the metrics), for
its TRUE class (the pointing game's convention: where does the evidence for
the right answer lie). Lesion annotations come from the dataset adapters:
BUSI masks (`datasets.busi.busi_masks`) and mini-MIAS circles
(`datasets.mias.mias_lesions`), mapped into the model's input space.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from ..config import load_run_config
from ..datasets.busi import busi_masks
from ..datasets.mias import mias_lesions
from ..files import atomic_path
from ..inference.batches import instance_batch
from ..inference.images import image_source
from ..inference.instances import build_instances
from ..inference.layout import CONFIG_FILE, MODEL_FILE, PREDICTIONS_FILE, fold_dirs
from ..inference.networks import trained_net
from ..models.weights import read_state_dict
from ..records import Manifest
from ..vocab import Label, Modality
from .gradcam import ABNORMAL, explain_instance
from .localisation import Score, circle_mask, score, to_model_space

LesionSource = Callable[[str, tuple[int, int]], np.ndarray | None]  # (image path, shape) -> mask or None


def busi_lesions() -> LesionSource:
    """BUSI: the union of an image's mask files (None when it has none or they are empty)."""
    def masks(path: str, shape: tuple[int, int]) -> np.ndarray | None:
        union = np.zeros(shape, dtype=bool)
        for file in busi_masks(path):
            m = np.asarray(Image.open(file).convert("L"))
            if m.shape != shape:
                return None  # a mask that does not match its image is not trusted
            union |= m > 127
        return union if union.any() else None

    return masks


def mias_circles(root: str | os.PathLike) -> LesionSource:
    """mini-MIAS: the union of an image's lesion circles from Info.txt."""
    table = {str(Path(k).resolve()): v for k, v in mias_lesions(root).items()}

    def masks(path: str, shape: tuple[int, int]) -> np.ndarray | None:
        circles = table.get(str(Path(path).resolve()), [])
        if not circles:
            return None
        union = np.zeros(shape, dtype=bool)
        for x, y, r in circles:
            union |= circle_mask(shape, (x, y), r)
        return union

    return masks


def shuffle_weights(seed: int = 0) -> Callable[[torch.nn.Module], None]:
    """Permute the entries of every parameter tensor (backbone and head): same weight
    statistics, no learnt structure. A heatmap that survives this explains nothing learnt."""
    def perturb(net: torch.nn.Module) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in net.parameters():
                flat = param.view(-1)
                flat.copy_(flat[torch.randperm(flat.numel(), generator=gen)])

    return perturb


def synthetic_lesions(lesions_csv: str | os.PathLike) -> LesionSource:
    """The synthetic cohort's lesions.csv (cx, cy, radius of each image where one is drawn)."""
    root = Path(lesions_csv).resolve().parent
    table = pd.read_csv(lesions_csv)
    table = table[table["lesion"] == 1]
    circles = {str((root / p).resolve()): (cx, cy, r) for p, cx, cy, r in
               zip(table["path"], table["cx"], table["cy"], table["radius"], strict=True)}

    def masks(path: str, shape: tuple[int, int]) -> np.ndarray | None:
        found = circles.get(str(Path(path).resolve()))
        return None if found is None else circle_mask(shape, found[:2], found[2])

    return masks


@dataclass
class Explained:
    """One annotated image, its heatmap and its lesion, both in the model's input space."""

    score: Score
    image: np.ndarray
    heatmap: np.ndarray
    lesion: np.ndarray


def explain_row(row_dir: str | os.PathLike, manifest: Manifest, modality: Modality, lesions: LesionSource,
                progress: bool = True, perturb: Callable[[torch.nn.Module], None] | None = None,
                target: str = "true", align: bool = False,
                cache_dir: str | os.PathLike | None = None) -> list[Explained]:
    """Grad-CAM of every annotated benign/malignant validation image of `modality`.

    `perturb` (optional) edits each fold network in place before explaining, e.g.
    `shuffle_weights` for the model-randomisation sanity check (Adebayo et al. 2018).
    `target`: "true" explains the image's true class, "abnormal" the evidence against normal
    (gradcam.ABNORMAL). `align`: see gradcam.explain_instance. `cache_dir`: the preprocessing
    cache (default: the row's train.cache_dir)."""
    row_dir = Path(row_dir)
    cfg = load_run_config(row_dir / CONFIG_FILE)
    size = cfg.model.backbone_for(modality).image_size
    source = image_source(cfg, cache_dir)
    pre = source.preprocessor(modality)
    instances, _ = build_instances(manifest.cases().values(), cfg.model.modality_set, cfg.model.slots)
    by_id = {i.instance_id: i for i in instances}
    slots = list(cfg.model.slots)
    out: list[Explained] = []
    folds = fold_dirs(row_dir)
    for fold_dir in tqdm(folds, desc="explain folds", disable=not progress, leave=False):
        net = trained_net(cfg, read_state_dict(fold_dir / MODEL_FILE), backbones_from_config=True)
        if perturb is not None:
            perturb(net)
        val = pd.read_csv(fold_dir / PREDICTIONS_FILE)
        for iid in val["instance_id"]:
            inst = by_id.get(iid)
            if inst is None or inst.label is Label.NORMAL:
                continue
            named = [("US", inst.us)] if modality is Modality.US else [(s.name, r) for s, r in inst.own_mg]
            for slot_name, rec in named:
                if rec is None:
                    continue
                img, info = pre.process_info(rec.path, rec.modality, rec.side)
                src = lesions(rec.path, tuple(info.shape))
                if src is None:
                    continue
                lesion = to_model_space(src, info, size)
                if not lesion.any():
                    continue
                goal = ABNORMAL if target == ABNORMAL else inst.label.index
                exp = explain_instance(net, instance_batch(inst, source), slots, class_index=goal, align=align)
                heat = exp.us if modality is Modality.US else exp.mg[slot_name]
                out.append(Explained(score(Path(rec.path).name, inst.label.value, heat, lesion), img, heat, lesion))
    return out


def examples_figure(items: list[Explained], path: str | os.PathLike, n: int = 4) -> Path:
    """The n best and n worst localised images (by energy inside the lesion): image with the
    lesion outline, and the Grad-CAM overlay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = sorted((e for e in items if not np.isnan(e.score.energy)), key=lambda e: -e.score.energy)
    chosen = [("good", e) for e in ranked[:n]] + [("bad", e) for e in ranked[::-1][:n]]
    fig, axes = plt.subplots(2, max(len(chosen), 1), figsize=(2.2 * max(len(chosen), 1), 4.6), squeeze=False)
    for col, (kind, e) in enumerate(chosen):
        for row in range(2):
            ax = axes[row, col]
            ax.imshow(e.image, cmap="gray", vmin=0, vmax=1)
            if row == 1:
                ax.imshow(e.heatmap, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.contour(e.lesion.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, col].set_title(f"{kind}: {e.score.label}\n{e.score.image[:18]}", fontsize=7)
        axes[1, col].set_title(f"energy {e.score.energy:.2f}, {'hit' if e.score.hit else 'miss'}", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
