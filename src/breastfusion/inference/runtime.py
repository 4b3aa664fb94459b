"""Where and how the network computes: device, arithmetic precision, memory layout, compilation.

Defaults keep CPU results what they always were: precision "auto" is plain fp32 on a CPU
(bf16 autocast only on a CUDA GPU with native bf16; a CPU without it runs bf16 several
times slower, 7x on the reference machine), and channels-last changes the memory layout
of convolutional networks only (faster, float rounding differs slightly; networks without
2-D convolutions, such as the cached-feature head, are untouched).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..choices import Precision

log = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    """"auto": the GPU when there is one, else the CPU; otherwise the device named."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def loader_kwargs(device: torch.device) -> dict[str, Any]:
    """DataLoader options for batches bound for `device`: pinned memory for a CUDA GPU, so the
    copy to it can overlap computation (see `to_device`)."""
    return {"pin_memory": True} if device.type == "cuda" else {}


# ---------------------------------------------------------------- precision

def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The reduced precision autocast computes in on `device`, or None for plain fp32.

    "auto" is bf16 only on a CUDA GPU that has it natively (no emulation), never on a CPU."""
    precision = Precision.parse(precision, "precision")
    if precision == Precision.BF16:
        return torch.bfloat16
    if precision == Precision.AUTO and device.type == "cuda" and torch.cuda.is_available() \
            and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return None


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """A context in which forward passes run at `precision` (see `autocast_dtype`); for fp32 it
    does nothing at all, so fp32 results are those of code without it."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------- memory layout

def has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _is_channels_last(model: nn.Module) -> bool:
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.dim() == 4]
    return bool(tensors) and all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors)


@contextlib.contextmanager
def memory_format(model: nn.Module, channels_last: bool) -> Iterator[bool]:
    """Within: a convolutional `model`'s 4-D weights in channels-last layout; yields whether they
    are (then also convert the image batches: `to_device(..., channels_last=True)`).

    The model is converted in place (its parameters stay the same objects, so an optimizer over
    them stays valid) and back to the default layout on exit, unless it was channels-last
    already: contexts nest. A model without 2-D convolutions is left alone."""
    use = channels_last and has_conv2d(model)
    convert = use and not _is_channels_last(model)
    if convert:
        model.to(memory_format=torch.channels_last)
    try:
        yield use
    finally:
        if convert:
            model.to(memory_format=torch.contiguous_format)


def tensor_to(value: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """One tensor on `device`; an asynchronous copy to a CUDA GPU (from pinned memory, see
    `loader_kwargs`); a 4-D image tensor in channels-last layout when asked."""
    value = value.to(device, non_blocking=device.type == "cuda")
    if channels_last and value.dim() == 4:
        value = value.contiguous(memory_format=torch.channels_last)
    return value


def to_device(batch: dict[str, torch.Tensor], device: torch.device,
              channels_last: bool = False) -> dict[str, torch.Tensor]:
    """A batch (dict of tensors) on `device`, each tensor as `tensor_to` puts it."""
    return {key: tensor_to(value, device, channels_last) for key, value in batch.items()}


# ---------------------------------------------------------------- compilation

def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class _EagerFallback:
    """Calls the compiled module; when a call fails (compilation happens lazily, at the first call
    and at recompilations), warns once and runs the eager module from then on. A genuine error in
    the model is raised again by the eager call."""

    def __init__(self, compiled: Callable, eager: nn.Module):
        self.compiled: Callable | None = compiled
        self.eager = eager

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: run eagerly instead
                log.warning("torch.compile failed (%s); running without compilation", _reason(exc))
                self.compiled = None
        return self.eager(*args, **kwargs)


def maybe_compile(model: nn.Module, enabled: bool) -> Callable:
    """What to call for forward passes: `torch.compile(model)` when enabled, else `model` itself.

    The compiled module shares the model's parameters and training mode; keep using `model` for
    its state dict, `train()`/`eval()` and the optimizer. When compilation fails (no compiler,
    an unsupported operation) a warning is logged and the model runs uncompiled."""
    if not enabled:
        return model
    try:
        compiled = torch.compile(model)
    except Exception as exc:  # noqa: BLE001 - compilation is an optional speed-up
        log.warning("torch.compile unavailable (%s); running without compilation", _reason(exc))
        return model
    return _EagerFallback(compiled, model)
