"""The training loop: weighted cross-entropy (+ ArcFace loss), SGD, best epoch on the TEST split.

The validation fold is never looked at here: model selection uses the test
split only (method.md, evaluation protocol).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import TrainConfig
from ..evaluation.metrics import macro_auc
from ..files import atomic_path
from ..models.network import NetOutput
from ..vocab import N_CLASSES

log = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def class_weights(labels: np.ndarray | list[int]) -> torch.Tensor:
    """Balanced weights from the training split: N / (C * n_c); 0 for an absent class."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=N_CLASSES).astype(float)
    present = counts > 0
    weights = np.zeros(N_CLASSES)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def loss_of(out: NetOutput, target: torch.Tensor, weight: torch.Tensor, arcface_weight: float) -> torch.Tensor:
    loss = F.cross_entropy(out.logits, target, weight=weight)
    for arc in out.arc_logits.values():
        loss = loss + arcface_weight * F.cross_entropy(arc, target, weight=weight)
    return loss


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def predict_logits(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, 3), dataset indices (N,)) in eval mode, no margin."""
    model.eval()
    logits, index = [], []
    for batch in loader:
        batch = _to(batch, device)
        logits.append(model(batch).logits.float().cpu().numpy())
        index.append(batch["index"].cpu().numpy())
    if not logits:
        return np.zeros((0, N_CLASSES), dtype=np.float32), np.zeros(0, dtype=int)
    return np.concatenate(logits), np.concatenate(index)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over classes, in float32 as the network computes it."""
    return torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float32)), dim=-1).numpy()


def predict_proba(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, 3), dataset indices (N,)) in eval mode, no margin."""
    logits, index = predict_logits(model, loader, device)
    return probabilities(logits), index


@dataclass
class FitResult:
    best_epoch: int
    best_score: float
    history: list[dict] = field(default_factory=list)
    resumed_after_epoch: int | None = None  # set when training continued from a checkpoint


def _save_checkpoint(path: Path, epoch: int, model: nn.Module, optimizer, best_state, best: FitResult,
                     generator: torch.Generator | None) -> None:
    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "best_state": best_state, "best_epoch": best.best_epoch, "best_score": best.best_score,
             "history": best.history, "torch_rng": torch.get_rng_state(),
             "loader_rng": generator.get_state() if generator is not None else None}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, model: nn.Module, optimizer, generator: torch.Generator | None):
    """Restore a checkpoint (weights_only: no code runs); None when absent or unusable."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except Exception as exc:  # noqa: BLE001 - a corrupt checkpoint means: start this training again
        log.warning("%s: unusable checkpoint (%s); training from the start", path.name, exc)
        return None
    torch.set_rng_state(state["torch_rng"])
    if generator is not None and state["loader_rng"] is not None:
        generator.set_state(state["loader_rng"])
    best = FitResult(state["best_epoch"], state["best_score"], list(state["history"]))
    return state["epoch"], state["best_state"], best


def fit(model: nn.Module, train_loader: DataLoader, test_loader: DataLoader, cfg: TrainConfig,
        arcface_weight: float, device: torch.device, progress: bool = True, desc: str = "train",
        checkpoint: Path | None = None) -> FitResult:
    """Train `model` in place; on return it holds the weights of the best epoch on the test split.

    With `checkpoint`, the whole training state is saved there at the end of an epoch (every
    `cfg.checkpoint_seconds`) and a training that finds one continues after its epoch, with the
    same result as if it had never stopped; the file is removed when training ends."""
    train_set = train_loader.dataset
    labels = [inst.label.index for inst in train_set.instances]
    weight = class_weights(labels).to(device)
    test_labels = np.array([inst.label.index for inst in test_loader.dataset.instances])
    optimizer = make_optimizer(model, cfg)
    best_state, best = None, FitResult(best_epoch=-1, best_score=-math.inf)
    generator = getattr(train_loader, "generator", None)
    start = 0
    if checkpoint is not None:
        restored = _load_checkpoint(checkpoint, model, optimizer, generator)
        if restored is not None:
            last, best_state, best = restored
            best.resumed_after_epoch = last
            start = last + 1
    saved_at = time.monotonic()
    bar = tqdm(range(start, cfg.epochs), desc=desc, unit="epoch", disable=not progress, leave=False,
               initial=start, total=cfg.epochs)
    for epoch in bar:
        train_set.set_epoch(epoch)
        model.train()
        total, seen = 0.0, 0
        for batch in train_loader:
            batch = _to(batch, device)
            target = batch["label"]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(model(batch, target), target, weight, arcface_weight)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(target)
            seen += len(target)
        probs, index = predict_proba(model, test_loader, device)
        y = test_labels[index]
        test_loss = float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)),
                                     torch.from_numpy(y), weight=weight.cpu()))
        auc = macro_auc(y, probs)
        score = -test_loss if cfg.select_by == "loss" or math.isnan(auc) else auc
        best.history.append({"epoch": epoch, "train_loss": total / max(seen, 1),
                             "test_loss": test_loss, "test_auc": auc})
        if score > best.best_score:
            best.best_epoch, best.best_score = epoch, score
            best_state = copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{total / max(seen, 1):.3f}", test_auc=f"{auc:.3f}")
        if checkpoint is not None and epoch + 1 < cfg.epochs \
                and time.monotonic() - saved_at >= cfg.checkpoint_seconds:
            _save_checkpoint(checkpoint, epoch, model, optimizer, best_state, best, generator)
            saved_at = time.monotonic()
    bar.close()
    if checkpoint is not None and checkpoint.is_file():
        checkpoint.unlink()
    if best_state is not None:
        model.load_state_dict(best_state)
    return best
