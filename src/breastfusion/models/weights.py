"""Reading and writing weights without executing anything a file carries.

Trained weights are written as safetensors (tensors and a string metadata
dict, no code). Reading accepts safetensors, or a PyTorch file loaded with
``weights_only=True``; anything else is refused with a WeightsError naming
the file and the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError
from ..files import atomic_path


def save_weights(model: nn.Module | dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> Path:
    """A model's (or a state dict's) tensors as one safetensors file, written atomically."""
    from safetensors.torch import save_file

    state = model.state_dict() if isinstance(model, nn.Module) else model
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict without executing pickled code (safetensors or weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the file's fault
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise WeightsError(f"{path}: not a loadable weights file ({reason})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: does not hold a state dict of tensors")
    return state


def load_into(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a weights file into `model` (strict: every key must match)."""
    state = read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:300]
        raise WeightsError(f"{path}: weights do not fit this model ({first})") from None
    return model
