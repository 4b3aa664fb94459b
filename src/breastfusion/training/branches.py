"""Single-modality networks inside multimodal ones, shared by the rows of an experiment.

The paper's fusion trains each fold's single-modality networks first and fuses their
embeddings; the single-modality rows of Table 3 train the very same networks. `BranchMemo`
trains each once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from ..config import ModelConfig, RunConfig, to_dict
from ..errors import WeightsError
from ..files import write_text
from ..inference.instances import Instance
from ..models.weights import load_into, save_weights
from ..vocab import Modality
from .checkpoint import FitResult

log = logging.getLogger(__name__)


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
        reset["mg_slots"], reset["bilateral"] = default.mg_slots, default.bilateral
    # the branch's own backbone, named the same whichever way the row sets it (shared `backbone`
    # or per-modality); the other modality's backbone does not reach it
    own = dataclasses.replace(model_cfg.backbone_for(modality))
    reset.update(backbone=dataclasses.replace(default.backbone), mg_backbone=None, us_backbone=None)
    reset["mg_backbone" if modality is Modality.MG else "us_backbone"] = own
    return dataclasses.replace(model_cfg, modalities=[modality.value], **reset)


def only(instances: list[Instance], modality: Modality) -> list[Instance]:
    """The single-modality instances hidden in multimodal ones (MG: one per case)."""
    if modality is Modality.US:
        return [dataclasses.replace(i, mg=(), slots=()) for i in instances]
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
