"""Device concerns: precision (auto = fp32 on a CPU), channels-last layout, torch.compile fallback."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from breastfusion.config import BackboneConfig, RunConfig, TrainConfig, from_dict
from breastfusion.errors import ConfigError
from breastfusion.inference import runtime as dev
from breastfusion.inference.runtime import pick_device
from breastfusion.models.network import BreastFusionNet
from breastfusion.models.weights import save_weights
from breastfusion.training.loop import class_weights, fit, loss_of, predict_logits

from conftest import tiny_model_config

CPU = torch.device("cpu")


def test_auto_precision_on_a_cpu_is_fp32():
    assert dev.autocast_dtype(CPU, "auto") is None and dev.autocast_dtype(CPU, "fp32") is None
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with dev.autocast(CPU, "auto"):
        assert not torch.is_autocast_enabled("cpu")
        assert (a @ b).dtype == torch.float32
    assert TrainConfig().precision == "auto"
    assert dev.loader_kwargs(CPU) == {} and dev.loader_kwargs(torch.device("cuda")) == {"pin_memory": True}
    assert pick_device("cpu") == CPU  # still importable from the loop


def test_bf16_when_asked_computes_in_bf16():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with dev.autocast(CPU, "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        dev.autocast_dtype(CPU, "fp16")


def test_precision_is_validated_like_the_other_fields():
    with pytest.raises(ConfigError, match="train.precision 'fp16'"):
        from_dict(RunConfig, {"train": {"precision": "fp16"}}).validate()
    with pytest.raises(ConfigError, match="train.channels_last must be bool"):
        from_dict(RunConfig, {"train": {"channels_last": "yes"}})
    from_dict(RunConfig, {"train": {"precision": "bf16", "channels_last": False, "compile": True}}).validate()


def _image_batches(n: int = 6, size: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, 4, dtype=torch.bool)
    mask[0, 1] = False
    return [{"mg": torch.rand(n, 4, 1, size, size, generator=g), "mg_mask": mask,
             "us": torch.rand(n, 1, size, size, generator=g), "label": torch.arange(n) % 3,
             "index": torch.arange(n)}]


class _Items(torch.utils.data.Dataset):
    """Items of one dict batch, with the `instances` and `set_epoch` fit expects."""

    def __init__(self, batch):
        self.batch = batch
        self.instances = [SimpleNamespace(label=SimpleNamespace(index=int(y))) for y in batch["label"]]

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return len(self.instances)

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def _net():
    torch.manual_seed(0)
    cfg = tiny_model_config(backbone=BackboneConfig(name="resnet18", weights="none", frozen="stem", image_size=32))
    return BreastFusionNet(cfg)


def test_channels_last_gives_the_contiguous_logits_and_restores_the_layout(tmp_path):
    net = _net()
    conv = net.us_backbone.net.conv1.weight
    loader = DataLoader(_Items(_image_batches()[0]), batch_size=3)
    plain, index = predict_logits(net, loader, CPU)
    fast, index2 = predict_logits(net, loader, CPU, channels_last=True)
    assert fast.dtype == np.float32 and np.array_equal(index, index2)
    np.testing.assert_allclose(fast, plain, atol=1e-5)
    assert conv.is_contiguous()  # back to the default layout after prediction
    with dev.memory_format(net, True) as used:
        assert used and conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        with dev.memory_format(net, True):  # nested: already channels-last, left so
            pass
        assert conv.is_contiguous(memory_format=torch.channels_last)
        batch = dev.to_device(_image_batches()[0], CPU, channels_last=True)
        assert batch["us"].is_contiguous(memory_format=torch.channels_last)
    assert conv.is_contiguous()
    head_only = torch.nn.Linear(3, 3)
    with dev.memory_format(head_only, True) as used:
        assert not used  # no convolution: nothing to convert


def test_channels_last_training_step_gives_the_contiguous_gradients():
    """One forward/backward at the same weights, BatchNorm on its running statistics. (Batch
    statistics over the 4 values of this tiny net's 1x1 maps amplify rounding differences
    by orders of magnitude, and by how much depends on the thread count.)"""
    batch = _image_batches(n=8)[0]
    weight = class_weights(batch["label"].numpy())
    grads = []
    for channels_last in (False, True):
        net = _net().eval()
        with dev.memory_format(net, channels_last):
            b = dev.to_device(batch, CPU, channels_last)
            loss_of(net(b, b["label"]), b["label"], weight, 1.0).backward()
            grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    plain, fast = grads
    assert plain.keys() == fast.keys() and any("conv" in n for n in plain)
    for name in plain:
        scale = plain[name].abs().max().clamp_min(1e-3)
        assert (plain[name] - fast[name]).abs().max() <= 1e-4 * scale + 1e-6, name  # +: structural zeros


def test_fit_with_channels_last_returns_the_model_in_its_own_layout(tmp_path):
    data = _Items(_image_batches(n=8)[0])
    net = _net()
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, channels_last=True, select_by="loss")
    train = DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    result = fit(net, train, DataLoader(data, batch_size=8), cfg, 1.0, CPU, progress=False)
    assert result.best_epoch in (0, 1) and np.isfinite(result.history[-1]["train_loss"])
    assert all(p.is_contiguous() for p in net.parameters())
    save_weights(net, tmp_path / "net.safetensors")


def test_compile_failure_warns_and_returns_the_model(monkeypatch, caplog):
    model = torch.nn.Linear(4, 2)
    assert dev.maybe_compile(model, False) is model

    def refuse(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", refuse)
    with caplog.at_level(logging.WARNING, logger="breastfusion.inference.runtime"):
        assert dev.maybe_compile(model, True) is model
    assert "no compiler here" in caplog.text

    # compilation that fails lazily, at the first call: warned once, then eager from there on
    calls = []

    def fails_when_called(module):
        def call(*a, **k):
            calls.append(1)
            raise RuntimeError("backend failed")
        return call

    monkeypatch.setattr(torch, "compile", fails_when_called)
    caplog.clear()
    x = torch.randn(3, 4)
    forward = dev.maybe_compile(model, True)
    with caplog.at_level(logging.WARNING, logger="breastfusion.inference.runtime"):
        torch.testing.assert_close(forward(x), model(x))
        torch.testing.assert_close(forward(x), model(x))
    assert len(calls) == 1 and caplog.text.count("backend failed") == 1
