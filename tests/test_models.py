import copy

import pytest
import torch

from breastfusion.config import BackboneConfig
from breastfusion.errors import WeightsError
from breastfusion.models.backbones import build_backbone, imagenet_weights_path
from breastfusion.models.network import BreastFusionNet
from breastfusion.models.weights import read_state_dict
from breastfusion.vocab import N_CLASSES

from conftest import tiny_model_config


def _batch(b=3, views=4, size=32, mask=None):
    torch.manual_seed(1)
    batch = {"mg": torch.rand(b, views, 1, size, size), "us": torch.rand(b, 1, size, size)}
    batch["mg_mask"] = torch.ones(b, views, dtype=torch.bool) if mask is None else mask
    return batch


@pytest.mark.parametrize("modalities,fusion,arcface", [
    (["US"], "concat", True), (["MG"], "concat", True), (["MG", "US"], "concat", True),
    (["MG", "US"], "concat", False), (["MG", "US"], "cross_attention", True),
    (["MG", "US"], "cross_attention", False),
])
def test_output_shapes(modalities, fusion, arcface):
    cfg = tiny_model_config(modalities=modalities, fusion=fusion, arcface=arcface)
    net = BreastFusionNet(cfg).eval()
    out = net(_batch())
    assert out.logits.shape == (3, N_CLASSES)
    assert set(m.value for m in out.embeddings) == set(modalities)
    for emb in out.embeddings.values():
        assert emb.shape == (3, cfg.embedding_dim)
    assert len(out.arc_logits) == (len(modalities) if arcface else 0)
    if "MG" in modalities:
        assert out.view_weights.shape == (3, 4)
        assert torch.allclose(out.view_weights.sum(-1), torch.ones(3))


def test_paper_dimensions_by_default():
    from breastfusion.config import ModelConfig
    from breastfusion.models.network import FusionHead

    head = FusionHead(ModelConfig(), 2048)
    linears = [m for m in head.mg.view_mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 1024), (1024, 512)]
    assert tuple(head.mg.embed.weight.shape) == (256, 512)
    assert [(m.in_features, m.out_features) for m in head.classifier.classifier
            if isinstance(m, torch.nn.Linear)] == [(512, 128), (128, 64), (64, 3)]


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet50", 2048), ("googlenet", 1024),
                                      ("efficientnet_lite0", 1280)])
def test_backbone_feature_dims(name, dim):
    backbone = build_backbone(BackboneConfig(name=name, weights="none", frozen="none")).eval()
    with torch.no_grad():
        assert backbone(torch.rand(2, 1, 64, 64)).shape == (2, dim)


def test_frozen_parameters_unchanged_after_step_others_change():
    cfg = tiny_model_config()
    net = BreastFusionNet(cfg).train()
    backbone = net.mg_backbone
    frozen = {n: p.detach().clone() for n, p in backbone.net.named_parameters()
              if n.startswith(("conv1", "bn1", "layer1"))}
    frozen_stats = {n: b.clone() for n, b in backbone.net.named_buffers() if n.startswith(("bn1", "layer1"))}
    trainable = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    assert frozen and all(not p.requires_grad for n, p in backbone.net.named_parameters() if n in frozen)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    target = torch.tensor([0, 1, 2])
    out = net(_batch(), target)
    loss = torch.nn.functional.cross_entropy(out.logits, target) + sum(
        torch.nn.functional.cross_entropy(a, target) for a in out.arc_logits.values())
    loss.backward()
    opt.step()
    params = dict(backbone.net.named_parameters())
    for n, before in frozen.items():
        assert torch.equal(params[n], before), n
    buffers = dict(backbone.net.named_buffers())
    for n, before in frozen_stats.items():
        assert torch.equal(buffers[n], before), n  # frozen BatchNorm keeps its statistics
    now = dict(net.named_parameters())
    changed = [n for n, before in trainable.items() if not torch.equal(now[n], before)]
    assert any(n.startswith("mg_backbone.net.layer4") for n in changed)
    assert any(n.startswith("head.") for n in changed)
    assert len(changed) >= 0.9 * len(trainable)


@pytest.mark.parametrize("training", [False, True])
def test_masked_view_pixels_change_nothing(training):
    cfg = tiny_model_config()
    torch.manual_seed(0)
    net = BreastFusionNet(cfg)
    net.train(training)
    mask = torch.tensor([[True, True, False, True], [True, False, False, False], [True, True, True, True]])
    a = _batch(mask=mask)
    b = copy.deepcopy(a)
    b["mg"][0, 2] = torch.rand_like(b["mg"][0, 2]) * 50 + 3
    b["mg"][1, 1:] = float("nan")
    target = torch.tensor([0, 1, 2])
    with torch.no_grad():
        out_a, out_b = net(a, target), net(b, target)
    assert torch.isfinite(out_b.logits).all()
    assert torch.equal(out_a.logits, out_b.logits)
    assert out_a.view_weights[0, 2] == 0 and (out_a.view_weights[1, 1:] == 0).all()
    changed = copy.deepcopy(a)
    changed["mg"][0, 1] += 0.5  # a present view does matter
    with torch.no_grad():
        assert not torch.equal(net(changed, target).logits[0], out_a.logits[0])


def test_imagenet_weights_never_downloaded(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsError, match="never downloads"):
        imagenet_weights_path("resnet50")


def test_efficientnet_lite0_imagenet_weights_load_offline():
    backbone = build_backbone(BackboneConfig(name="efficientnet_lite0", weights="imagenet", frozen="all"))
    assert backbone.fully_frozen
    with torch.no_grad():
        feats = backbone.eval()(torch.rand(2, 1, 96, 96))
    assert feats.shape == (2, 1280) and torch.isfinite(feats).all()


def test_weights_from_file_and_bad_files(tmp_path):
    source = build_backbone(BackboneConfig(name="resnet18", weights="none", frozen="none"))
    good = tmp_path / "r18.pth"
    torch.save(source.net.state_dict(), good)
    loaded = build_backbone(BackboneConfig(name="resnet18", weights=str(good), frozen="none"))
    assert torch.equal(loaded.net.conv1.weight, source.net.conv1.weight)
    with pytest.raises(WeightsError, match="do not fit"):
        build_backbone(BackboneConfig(name="resnet50", weights=str(good)))
    evil = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(1), "payload": _Payload()}, evil)
    with pytest.raises(WeightsError, match="not a loadable weights file"):
        read_state_dict(evil)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError):
        read_state_dict(junk)
    with pytest.raises(WeightsError, match="not found"):
        read_state_dict(tmp_path / "missing.pth")


class _Payload:
    """An arbitrary Python object: unpickling it would run code, so loading must refuse."""


def test_transfer_branch_copies_and_freezes_one_modality():
    from breastfusion.models.network import transfer_branch
    from breastfusion.vocab import Modality

    torch.manual_seed(0)
    single = BreastFusionNet(tiny_model_config(modalities=["US"]))
    torch.manual_seed(1)
    fused = BreastFusionNet(tiny_model_config())
    mg_before = {k: v.clone() for k, v in fused.state_dict().items() if k.startswith("head.mg.")}
    transfer_branch(single, fused, Modality.US, freeze=True)
    src, dst = single.state_dict(), fused.state_dict()
    for key in dst:
        if key.startswith(("us_backbone.", "head.us.", "head.arc_heads.US.")):
            assert torch.equal(dst[key], src[key]), key
    assert all(torch.equal(dst[k], v) for k, v in mg_before.items())  # the other branch untouched
    frozen = {n for n, p in fused.named_parameters() if not p.requires_grad}
    assert any(n.startswith("head.us.") for n in frozen)
    assert not any(n.startswith(("head.mg.", "head.classifier.")) for n in frozen)
    with torch.no_grad():  # same US embedding as the single-modality network
        a = single.eval()(_batch()).embeddings[Modality.US]
        b = fused.eval()(_batch()).embeddings[Modality.US]
    assert torch.allclose(a, b, atol=1e-6)


def test_plain_habib_head_averages_present_views_and_concatenates():
    from breastfusion.models.network import PlainFusionHead

    cfg = tiny_model_config(head="plain", arcface=False)
    head = PlainFusionHead(cfg, 5)
    mg = torch.randn(2, 4, 5)
    mask = torch.tensor([[True, False, True, False], [True, True, True, True]])
    us = torch.randn(2, 5)
    out = head(mg, mask, us)
    expected_mg = torch.stack([mg[0, [0, 2]].mean(0), mg[1].mean(0)])
    expected = head.classifier(torch.cat([expected_mg, us], dim=1))
    assert torch.allclose(out.logits, expected, atol=1e-6)
    assert not out.arc_logits and not out.embeddings
    mg2 = mg.clone()
    mg2[0, 1] = float("nan")  # a masked view never reaches the output
    assert torch.allclose(head(mg2, mask, us).logits, out.logits, atol=1e-6)
    net = BreastFusionNet(cfg).eval()
    assert net(_batch()).logits.shape == (3, N_CLASSES)


def test_random_init_backbone_is_one_fixed_network_and_leaves_the_rng_alone():
    """weights: none names one network, so cached features and saved heads refer to it."""
    cfg = BackboneConfig(name="resnet18", weights="none", frozen="all", image_size=32)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_backbone(cfg)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's random stream is untouched
    b = build_backbone(cfg)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert a.cam_layer is a.net.layer4 and not any(k.startswith("cam_layer") for k in a.state_dict())


@pytest.mark.parametrize("kernel,stride,size", [(1, 1, 16), (3, 1, 16), (5, 1, 15), (3, 2, 16), (3, 2, 15),
                                                (5, 2, 16), (5, 2, 17)])
def test_same_padding_matches_tensorflow(kernel, stride, size):
    """SameConv2d: output size ceil(n / stride), extra padding at the bottom/right (TensorFlow's
    'SAME'), whether the convolution pads (symmetric case) or a padded copy does."""
    import math

    import torch.nn.functional as F

    from breastfusion.models.efficientnet_lite import SameConv2d

    torch.manual_seed(0)
    conv = SameConv2d(4, 6, kernel, stride=stride, bias=False)
    x = torch.rand(2, 4, size, size)
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    expected = F.conv2d(F.pad(x, [total // 2, total - total // 2] * 2), conv.weight, None, stride)
    out = conv(x)
    assert out.shape[-1] == math.ceil(size / stride)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_spatial_attention_pool_is_a_weighted_mean_over_cells_blind_to_their_order():
    """Attention pooling over a feature map's cells (tiles): weights sum to one per image, the
    pooled vector is their weighted mean, and shuffling the cells changes nothing (a bag of tiles)."""
    from breastfusion.models.attention import SpatialAttentionPool

    torch.manual_seed(0)
    att = SpatialAttentionPool(16, hidden=8)
    fmap = torch.randn(3, 16, 4, 5)
    w = att.weights(fmap)
    assert w.shape == (3, 4, 5) and torch.allclose(w.sum(dim=(1, 2)), torch.ones(3))
    assert torch.allclose(att(fmap), torch.einsum("bhw,bchw->bc", w, fmap), atol=1e-6)
    order = torch.randperm(20)
    shuffled = fmap.flatten(2)[:, :, order].view(3, 16, 4, 5)
    assert torch.allclose(att(shuffled), att(fmap), atol=1e-6)
    one = torch.zeros(1, 16, 4, 5)
    one[0, :, 2, 3] = 5.0  # one distinct cell: its weight differs from the others'
    assert att.weights(one)[0, 2, 3] != att.weights(one)[0, 0, 0]


def test_attention_over_larger_cells_weighs_averaged_tiles():
    """attention_cell=k: attention weighs k x k averaged tiles (a partial last tile averaged over
    what it holds), i.e. the same attention applied to the average-pooled map; the backbone
    config reaches the pool."""
    from breastfusion.config import BackboneConfig
    from breastfusion.models.attention import SpatialAttentionPool
    from breastfusion.models.backbones import build_backbone

    torch.manual_seed(0)
    fine = SpatialAttentionPool(16, hidden=8)
    coarse = SpatialAttentionPool(16, hidden=8, cell=2)
    coarse.load_state_dict(fine.state_dict())
    fmap = torch.randn(2, 16, 5, 4)
    tiles = torch.stack([fmap[:, :, 0:2].mean((2,)), fmap[:, :, 2:4].mean((2,)), fmap[:, :, 4]], 2)
    tiles = torch.stack([tiles[..., 0:2].mean(-1), tiles[..., 2:4].mean(-1)], -1)  # (2, 16, 3, 2)
    assert coarse.weights(fmap).shape == (2, 3, 2)
    torch.testing.assert_close(coarse(fmap), fine(tiles))
    assert not torch.allclose(coarse(fmap), fine(fmap))
    bb = build_backbone(BackboneConfig(name="efficientnet_lite0", weights="none", pooling="attention",
                                       attention_cell=2, image_size=64))
    assert bb.attention_pool.cell == 2
