"""Training that survives being killed: the state of a training at the end of an epoch (model,
optimizer, random generators, best epoch so far), saved atomically and restored so that the
resumed training gives the same result as one that never stopped (tests/test_crash_resume.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..files import atomic_path

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    best_epoch: int
    best_score: float
    history: list[dict] = field(default_factory=list)
    resumed_after_epoch: int | None = None  # set when training continued from a checkpoint


def save_checkpoint(path: Path, epoch: int, model: nn.Module, optimizer, best_state, best: FitResult,
                     generator: torch.Generator | None, rng_by_rank: list[torch.Tensor] | None = None) -> None:
    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "best_state": best_state, "best_epoch": best.best_epoch, "best_score": best.best_score,
             "history": best.history, "torch_rng": torch.get_rng_state(),
             "loader_rng": generator.get_state() if generator is not None else None}
    if rng_by_rank is not None:  # distributed: every rank's own generator
        state["torch_rng_by_rank"] = rng_by_rank
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_checkpoint(path: Path) -> dict | None:
    """A checkpoint's contents (weights_only: no code runs); None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt checkpoint means: start this training again
        log.warning("%s: unusable checkpoint (%s); training from the start", path.name, exc)
        return None


def restore_checkpoint(state: dict, name: str, model: nn.Module, optimizer, generator: torch.Generator | None,
                        rank: int = 0):
    """Put a checkpoint's training state back; None when it does not fit this training."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except Exception as exc:  # noqa: BLE001 - a checkpoint that does not fit means: start again
        log.warning("%s: unusable checkpoint (%s); training from the start", name, exc)
        return None
    by_rank = state.get("torch_rng_by_rank")
    torch.set_rng_state(by_rank[rank] if by_rank is not None and rank < len(by_rank) else state["torch_rng"])
    if generator is not None and state["loader_rng"] is not None:
        generator.set_state(state["loader_rng"])
    best = FitResult(state["best_epoch"], state["best_score"], list(state["history"]))
    return state["epoch"], state["best_state"], best
