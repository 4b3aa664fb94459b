"""The training loop: weighted cross-entropy (+ ArcFace loss), SGD, best epoch on the TEST split.

The validation fold is never looked at here: model selection uses the test
split only (method.md, evaluation protocol). Device, precision and memory layout
are in `inference/runtime.py`; checkpoints in `checkpoint.py`; training over several processes
(DDP) in `distributed.py`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..choices import Optimizer, SelectBy
from ..config import TrainConfig
from ..evaluation.metrics import macro_auc
from ..inference.runtime import autocast, maybe_compile, memory_format, to_device
from ..models.backbones import Backbone
from ..models.network import NetOutput
from ..vocab import N_CLASSES
from .checkpoint import FitResult, read_checkpoint, restore_checkpoint, save_checkpoint
from .distributed import Distributed, distributed_eval_loader, distributed_loader, is_sharded, replicate

log = logging.getLogger(__name__)


def class_weights(labels: np.ndarray | list[int]) -> torch.Tensor:
    """Balanced weights from the training split: N / (C * n_c); 0 for an absent class."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=N_CLASSES).astype(float)
    present = counts > 0
    weights = np.zeros(N_CLASSES)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def loss_of(out: NetOutput, target: torch.Tensor, weight: torch.Tensor, arcface_weight: float) -> torch.Tensor:
    """Class-weighted cross-entropy of the logits plus `arcface_weight` times that of each ArcFace
    head, in fp32 whatever precision the forward pass ran at."""
    loss = F.cross_entropy(out.logits.float(), target, weight=weight)
    for arc in out.arc_logits.values():
        loss = loss + arcface_weight * F.cross_entropy(arc.float(), target, weight=weight)
    return loss


def global_loss_of(out: NetOutput, target: torch.Tensor, weight: torch.Tensor, arcface_weight: float,
                   sample_weight: torch.Tensor, dist: Distributed) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's loss, the global batch size) in distributed training, such that DDP's
    gradient (the mean of the ranks' gradients) is that of `loss_of` over the global batch.

    `loss_of` is sum_i w_i l_i / sum_i w_i over the batch (w_i: the class weight of sample i;
    likewise for each ArcFace term). A rank holds a slice of the batch: it sums w_i l_i over its
    samples (padding has sample_weight 0), divides by sum_i w_i all-reduced over the ranks (a
    constant, as the weights are in `loss_of`) and multiplies by the world size, which DDP's
    averaging divides out. The mean over ranks of these losses is the global batch's loss."""
    w = weight[target] * sample_weight
    sums = dist.all_reduce_sum(torch.stack([w.sum(), sample_weight.sum()]).detach())

    def part(logits: torch.Tensor) -> torch.Tensor:
        return (F.cross_entropy(logits.float(), target, reduction="none") * w).sum()

    loss = part(out.logits)
    for arc in out.arc_logits.values():
        loss = loss + arcface_weight * part(arc)
    return loss * (dist.world / sums[0]), sums[1]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer over the trainable parameters; with `backbone_lr_scale` != 1 the
    pretrained networks inside the backbones (`Backbone.net`) form a second group at lr x scale."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    params: list = trainable
    if cfg.backbone_lr_scale != 1.0:
        pretrained = {id(p) for m in model.modules() if isinstance(m, Backbone) for p in m.net.parameters()}
        groups = [{"params": [p for p in trainable if id(p) not in pretrained]},
                  {"params": [p for p in trainable if id(p) in pretrained], "lr": cfg.lr * cfg.backbone_lr_scale}]
        params = [g for g in groups if g["params"]]
    if cfg.optimizer == Optimizer.ADAMW:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@torch.no_grad()
def predict_logits(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32",
                   channels_last: bool = False, dist: Distributed | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, 3) float32, dataset indices (N,)) in eval mode, no margin.

    `precision` and `channels_last` as in TrainConfig (the default: plain fp32, the model's own
    layout). With an enabled `dist`, every rank predicts its share of the loader's items and
    gets all predictions, in the loader's order (call it on every rank)."""
    sharded = dist is not None and dist.enabled
    if sharded and not is_sharded(loader):
        loader = distributed_eval_loader(loader, dist)
    model.eval()
    logits, index = [], []
    with memory_format(model, channels_last) as cl:
        for batch in loader:
            batch = to_device(batch, device, cl)
            with autocast(device, precision):
                out = model(batch).logits
            logits.append(out.float().cpu().numpy())
            index.append(batch["index"].cpu().numpy())
    if sharded:
        parts = dist.all_gather_object((logits, index))
        logits = [x for part, _ in parts for x in part]
        index = [x for _, part in parts for x in part]
    if not logits:
        return np.zeros((0, N_CLASSES), dtype=np.float32), np.zeros(0, dtype=int)
    return np.concatenate(logits), np.concatenate(index)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over classes, in float32 as the network computes it."""
    return torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float32)), dim=-1).numpy()


def predict_proba(model: nn.Module, loader: DataLoader, device: torch.device, **options
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, 3), dataset indices (N,)) in eval mode, no margin; `options` as in
    `predict_logits`."""
    logits, index = predict_logits(model, loader, device, **options)
    return probabilities(logits), index


def fit(model: nn.Module, train_loader: DataLoader, test_loader: DataLoader, cfg: TrainConfig,
        arcface_weight: float, device: torch.device, progress: bool = True, desc: str = "train",
        checkpoint: Path | None = None, dist: Distributed | None = None) -> FitResult:
    """Train `model` in place; on return it holds the weights of the best epoch on the test split.

    With `checkpoint`, the whole training state is saved there at the end of an epoch (every
    `cfg.checkpoint_seconds`) and a training that finds one continues after its epoch, with the
    same result as if it had never stopped; the file is removed when training ends.

    `cfg.precision`, `cfg.channels_last` and `cfg.compile` choose how the network computes
    (inference/runtime.py). With an enabled `dist` (call on every rank; the model on `dist.device`): the
    model is trained in DistributedDataParallel on each rank's share of every batch of
    `train_loader` (a single-process loader: same batches, same loss, same selection as one
    process, see distributed.py), the test split is predicted in shards, only the main rank
    writes the checkpoint (all read it), and every rank returns with the same best weights."""
    dist = dist if dist is not None else Distributed.single(device)
    if dist.enabled:
        device = dist.device  # this rank's GPU (cuda:LOCAL_RANK), whatever "cuda" the caller named
    train_set = train_loader.dataset
    labels = [inst.label.index for inst in train_set.instances]
    weight = class_weights(labels).to(device)
    test_labels = np.array([inst.label.index for inst in test_loader.dataset.instances])
    generator = getattr(train_loader, "generator", None)
    if dist.enabled and not is_sharded(train_loader):
        train_loader = distributed_loader(train_loader, dist)
    if dist.enabled and not is_sharded(test_loader):
        test_loader = distributed_eval_loader(test_loader, dist)
    best_state, best = None, FitResult(best_epoch=-1, best_score=-math.inf)
    with memory_format(model, cfg.channels_last) as channels_last:
        optimizer = make_optimizer(model, cfg)
        start = 0
        if checkpoint is not None:
            state = dist.broadcast_object(read_checkpoint(checkpoint) if dist.is_main else None)
            restored = None if state is None else \
                restore_checkpoint(state, checkpoint.name, model, optimizer, generator, dist.rank)
            if restored is not None:
                last, best_state, best = restored
                best.resumed_after_epoch = last
                start = last + 1
        with replicate(model, dist) as trained:
            forward = maybe_compile(trained, cfg.compile)
            saved_at = time.monotonic()
            bar = tqdm(range(start, cfg.epochs), desc=desc, unit="epoch", disable=not (progress and dist.is_main),
                       leave=False, initial=start, total=cfg.epochs)
            for epoch in bar:
                train_set.set_epoch(epoch)
                trained.train()
                # float64, as Python floats were summed before: the history's numbers are unchanged,
                # and no .item() per step waits for a GPU
                total = torch.zeros((), dtype=torch.float64, device=device)
                seen = torch.zeros((), dtype=torch.float64, device=device)
                for batch in train_loader:
                    batch = to_device(batch, device, channels_last)
                    target = batch["label"]
                    optimizer.zero_grad(set_to_none=True)
                    with autocast(device, cfg.precision):
                        out = forward(batch, target)
                    if dist.enabled:  # the global batch's loss is the mean of the ranks' losses
                        loss, n = global_loss_of(out, target, weight, arcface_weight, batch["sample_weight"], dist)
                        total += loss.detach().double() * n.double() / dist.world
                    else:
                        loss, n = loss_of(out, target, weight, arcface_weight), len(target)
                        total += loss.detach().double() * n
                    loss.backward()
                    optimizer.step()
                    seen += n
                train_loss = dist.all_reduce_sum(total).item() / max(seen.item(), 1)
                probs, index = predict_proba(model, test_loader, device, precision=cfg.precision,
                                             channels_last=channels_last, dist=dist)
                y = test_labels[index]
                test_loss = float(F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-12)),
                                             torch.from_numpy(y), weight=weight.cpu()))
                auc = macro_auc(y, probs)
                score = -test_loss if cfg.select_by == SelectBy.LOSS or math.isnan(auc) else auc
                best.history.append({"epoch": epoch, "train_loss": train_loss, "test_loss": test_loss,
                                     "test_auc": auc})
                if score > best.best_score:
                    best.best_epoch, best.best_score = epoch, score
                    best_state = copy.deepcopy(model.state_dict())
                bar.set_postfix(loss=f"{train_loss:.3f}", test_auc=f"{auc:.3f}")
                if checkpoint is not None and epoch + 1 < cfg.epochs:
                    # one clock decides, so that every rank checkpoints at the same epoch
                    due = dist.broadcast_object(time.monotonic() - saved_at >= cfg.checkpoint_seconds)
                    if due:
                        rng_by_rank = dist.all_gather_object(torch.get_rng_state()) if dist.enabled else None
                        if dist.is_main:
                            save_checkpoint(checkpoint, epoch, model, optimizer, best_state, best, generator,
                                             rng_by_rank)
                        dist.barrier()
                        saved_at = time.monotonic()
            bar.close()
    if checkpoint is not None and dist.is_main and checkpoint.is_file():
        checkpoint.unlink()
    if best_state is not None:
        model.load_state_dict(best_state)
    return best
