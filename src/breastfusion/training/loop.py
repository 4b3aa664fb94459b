"""The training loop: weighted cross-entropy (+ ArcFace loss), SGD, best epoch on the TEST split.

The validation fold is never looked at here: model selection uses the test
split only (method.md, evaluation protocol).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import TrainConfig
from ..evaluation.metrics import macro_auc
from ..models.network import NetOutput
from ..vocab import N_CLASSES


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


def fit(model: nn.Module, train_loader: DataLoader, test_loader: DataLoader, cfg: TrainConfig,
        arcface_weight: float, device: torch.device, progress: bool = True, desc: str = "train") -> FitResult:
    """Train `model` in place; on return it holds the weights of the best epoch on the test split."""
    train_set = train_loader.dataset
    labels = [inst.label.index for inst in train_set.instances]
    weight = class_weights(labels).to(device)
    test_labels = np.array([inst.label.index for inst in test_loader.dataset.instances])
    optimizer = make_optimizer(model, cfg)
    best_state, best = None, FitResult(best_epoch=-1, best_score=-math.inf)
    bar = tqdm(range(cfg.epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
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
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return best
