"""Partial mode: the backbone's frozen stages run once per image (activation maps cached on
disk), the later stages and the heads train on those maps. It is fine-tune mode with the same
frozen stages, computed in another order: same network, same logits."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from breastfusion.config import BackboneConfig, CVConfig, RunConfig, TrainConfig
from breastfusion.evaluation.metrics import macro_auc
from breastfusion.experiment import run_experiment
from breastfusion.inference.instances import build_instances
from breastfusion.models.network import BreastFusionNet
from breastfusion.models.weights import read_state_dict
from breastfusion.preprocess.pipeline import ImageSource, PreprocessCache, Preprocessor
from breastfusion.records import read_manifest
from breastfusion.training.augment import Augment
from breastfusion.training.data import FeatureInstances, ImageInstances
from breastfusion.training.features import FeatureStore
from breastfusion.training.loop import make_optimizer
from breastfusion.vocab import Modality

from conftest import tiny_model_config, write_tiny_cohort


def _setup(tmp_path, backbone: BackboneConfig, size: int):
    manifest = read_manifest(write_tiny_cohort(tmp_path, n_cases=4, size=size + 8))
    cfg = tiny_model_config(backbone=backbone)
    instances, _ = build_instances(manifest.cases().values(), cfg.modality_set, cfg.slots)
    # drop one view of one case, so the view mask goes through both paths too
    instances[0] = type(instances[0])(**{**instances[0].__dict__, "mg": (None, *instances[0].mg[1:])})
    torch.manual_seed(0)
    net = BreastFusionNet(cfg).eval()
    cache = PreprocessCache(tmp_path / "cache", Preprocessor(size=size))
    source = ImageSource({Modality.MG: cache, Modality.US: cache})
    records = [r for i in instances for r in (*i.mg, i.us) if r is not None]
    return cfg, instances, net, cache, source, records


def _store(tmp_path, bb, cache, stage, dtype="fp32", copies=1):
    return FeatureStore(tmp_path / "cache", bb, cache, Augment(), copies=copies, stage=stage, dtype=dtype)


@pytest.mark.parametrize("name, stage, pooling, layer", [
    ("resnet18", "layer2", "avg", "head"), ("efficientnet_lite0", "layer3", "avg", "head"),
    ("efficientnet_lite0", "stem", "avg", "head"), ("resnet18", "all", "avg", "head"),
    ("resnet18", "all", "attention", "head"), ("efficientnet_lite0", "all", "attention", "blocks")])
def test_partial_mode_gives_the_fine_tune_logits_of_the_same_network(tmp_path, name, stage, pooling, layer):
    bb = BackboneConfig(name=name, weights="none", frozen=stage, image_size=48, pooling=pooling, feature_layer=layer)
    cfg, instances, net, cache, source, records = _setup(tmp_path, bb, 48)
    n = len(instances)
    images = next(iter(DataLoader(ImageInstances(instances, source, train=False), batch_size=n)))
    with torch.no_grad():
        fine = net(images).logits
    # each modality's activations through its own backbone, as prepare() does
    acts = {}
    for modality in (Modality.MG, Modality.US):
        store = _store(tmp_path, bb, cache, stage, "fp32")
        acts.update(store.features([r for r in records if r.modality is modality],
                                   backbone=net.backbone(modality), progress=False))
    some = next(iter(acts.values()))
    assert some.ndim == 4 and some.shape[0] == 2 and some.dtype == np.float32
    batch = next(iter(DataLoader(FeatureInstances(instances, acts, train=False, kind="act"), batch_size=n)))
    assert "us_act" in batch and "mg_act" in batch and "us" not in batch
    with torch.no_grad():
        partial = net(batch).logits
    assert torch.allclose(fine, partial, atol=1e-5 * max(fine.abs().max().item(), 1.0)), (fine - partial).abs().max()


def test_half_precision_activations_change_imagenet_features_by_under_0_1_percent(tmp_path):
    """fp16 storage (the default) rounds the activations; with ImageNet weights the pooled
    features move by about 1e-4 of their norm (measured 4e-5 to 8e-5 at layer2 / layer3)."""
    bb = BackboneConfig(name="efficientnet_lite0", weights="imagenet", frozen="layer3", image_size=96)
    cfg, instances, net, cache, source, records = _setup(tmp_path, bb, 96)
    us = [r for r in records if r.modality is Modality.US]
    backbone = net.us_backbone
    with torch.no_grad():
        exact = backbone(torch.stack([torch.from_numpy(cache.get(r.path, r.modality, r.side)) for r in us])[:, None])
        half = _store(tmp_path, bb, cache, "layer3", "fp16").features(us, backbone=backbone, progress=False)
        assert next(iter(half.values())).dtype == np.float16
        from_half = backbone.tail(torch.stack([torch.from_numpy(np.array(half[r.path][0], np.float32)) for r in us]))
    rel = ((exact - from_half).norm(dim=1) / exact.norm(dim=1)).max().item()
    assert 0 < rel < 1e-3, rel


def test_training_on_activations_changes_only_the_later_stages(tmp_path):
    bb = BackboneConfig(name="resnet18", weights="none", frozen="layer2", image_size=32)
    cfg, instances, net, cache, source, records = _setup(tmp_path, bb, 32)
    store = _store(tmp_path, bb, cache, "layer2")
    acts = store.features(records, backbone=net.mg_backbone, progress=False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    batch = next(iter(DataLoader(FeatureInstances(instances, acts, train=True, kind="act"), batch_size=8)))
    loss = torch.nn.functional.cross_entropy(net(batch).logits, batch["label"])
    loss.backward()
    opt.step()
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("us_backbone.net.layer4") for k in changed)
    assert any(k.startswith("mg_backbone.net.layer3") for k in changed)
    frozen = ("us_backbone.net.conv1", "us_backbone.net.bn1", "us_backbone.net.layer1", "us_backbone.net.layer2",
              "mg_backbone.net.layer2")
    assert not [k for k in changed if k.startswith(frozen)]


def test_attention_pooling_trains_on_a_frozen_backbone_and_nothing_else_of_it(tmp_path):
    """frozen: all with attention pooling: the backbone's convolutions and BatchNorm statistics stay
    as loaded, the attention over the map's cells (tiles of the image) learns."""
    bb = BackboneConfig(name="resnet18", weights="none", frozen="all", image_size=96, pooling="attention")
    cfg, instances, net, cache, source, records = _setup(tmp_path, bb, 96)  # 3 x 3 cells
    acts = {}
    for modality in (Modality.MG, Modality.US):
        acts.update(_store(tmp_path, bb, cache, "all").features([r for r in records if r.modality is modality],
                                                                backbone=net.backbone(modality), progress=False))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    batch = next(iter(DataLoader(FeatureInstances(instances, acts, train=True, kind="act"), batch_size=8)))
    torch.nn.functional.cross_entropy(net(batch).logits, batch["label"]).backward()
    opt.step()
    changed = {k for k, v in net.state_dict().items() if not torch.equal(before[k], v)}
    assert {k.split(".")[0] for k in changed if "_backbone." in k} == {"mg_backbone", "us_backbone"}
    assert all(".attention_pool." in k for k in changed if "_backbone." in k), changed
    assert not any(".net." in k for k in changed)


def test_activation_cache_is_reused_only_for_that_image_stage_and_size(tmp_path):
    bb = BackboneConfig(name="resnet18", weights="none", frozen="layer2", image_size=32)
    cfg, instances, net, cache, source, records = _setup(tmp_path, bb, 32)
    us = [r for r in records if r.modality is Modality.US]
    first = _store(tmp_path, bb, cache, "layer2")
    acts = first.features(us, backbone=net.us_backbone, progress=False)
    assert first.computed == len(us)

    again = _store(tmp_path, bb, cache, "layer2")
    acts2 = again.features(us, backbone=net.us_backbone, progress=False)
    assert again.computed == 0 and all(np.array_equal(acts[p], acts2[p]) for p in acts)

    other_stage = _store(tmp_path, bb, cache, "layer1")
    assert other_stage.dir != first.dir
    out = other_stage.features(us, backbone=net.us_backbone, progress=False)
    assert other_stage.computed == len(us) and next(iter(out.values())).shape[1] == 128 // 2

    bigger = PreprocessCache(tmp_path / "cache", Preprocessor(size=40))
    resized = _store(tmp_path, bb, bigger, "layer2")
    assert resized.dir != first.dir
    out = resized.features(us, backbone=net.us_backbone, progress=False)
    assert resized.computed == len(us) and next(iter(out.values())).shape[-1] == 5

    copies = _store(tmp_path, bb, cache, "layer2", copies=2)
    assert copies.dir != first.dir
    half = _store(tmp_path, bb, cache, "layer2", dtype="fp16")
    assert half.dir != first.dir

    # a changed image is recomputed, the others are read back
    changed = us[0].path
    Image.fromarray(np.full((40, 40), 7, np.uint8)).save(changed)
    fresh = PreprocessCache(tmp_path / "cache", Preprocessor(size=32))
    after_edit = _store(tmp_path, bb, fresh, "layer2")
    acts3 = after_edit.features(us, backbone=net.us_backbone, progress=False)
    assert after_edit.computed == 1 and not np.array_equal(acts3[changed], acts[changed])

    # a damaged cache file is recomputed, never used
    victim = after_edit._file(us[1])
    expected = np.array(acts3[us[1].path])
    damaged = victim.read_bytes()[:100]
    victim.unlink()  # (arrays read before stay valid: they map the old file)
    victim.write_bytes(damaged)
    repaired = _store(tmp_path, bb, fresh, "layer2")
    acts4 = repaired.features(us, backbone=net.us_backbone, progress=False)
    assert repaired.computed == 1 and np.array_equal(acts4[us[1].path], expected)


def test_activation_cache_keeps_the_feature_layer_apart_only_where_it_changes_the_map(tmp_path):
    """EfficientNet-Lite without its head stores other maps at stage 'all', the same maps before it."""
    cache = PreprocessCache(tmp_path / "cache", Preprocessor(size=32))
    head, blocks = (BackboneConfig(name="efficientnet_lite0", weights="none", frozen="all", feature_layer=layer)
                    for layer in ("head", "blocks"))
    assert _store(tmp_path, head, cache, "all").dir != _store(tmp_path, blocks, cache, "all").dir
    assert _store(tmp_path, head, cache, None).dir != _store(tmp_path, blocks, cache, None).dir
    assert _store(tmp_path, head, cache, "layer3").dir == _store(tmp_path, blocks, cache, "layer3").dir


def test_partial_mode_cross_validation_runs_and_resumes_to_the_same_metrics(tmp_path):
    manifest = read_manifest(write_tiny_cohort(tmp_path / "data", n_cases=15, size=40))
    model = tiny_model_config(backbone=BackboneConfig(name="resnet18", weights="none", frozen="layer2",
                                                      image_size=32, pooling="gem"))
    row = RunConfig(name="MM", model=model, cv=CVConfig(folds=3, test_folds=1),
                    train=TrainConfig(mode="partial", epochs=3, batch_size=8, feature_copies=1,
                                      cache_dir=str(tmp_path / "cache"), optimizer="adamw", lr=1e-3))
    first = run_experiment(manifest, [row], tmp_path / "run", progress=False)
    table = (tmp_path / "run" / "rows" / "MM" / "folds" / "fold_1" / "predictions.csv")
    probs = pd.read_csv(table)[["p_normal", "p_benign", "p_malignant"]].to_numpy()
    assert probs.std(axis=0).max() > 1e-4  # not one constant prediction
    table.unlink()  # fold 1 not done: a rerun trains it again
    again = run_experiment(manifest, [row], tmp_path / "run", progress=False)
    levels = ("instance", "patient", "patient_mean")
    assert json.dumps([first["rows"][0][k] for k in levels]) == json.dumps([again["rows"][0][k] for k in levels])


def test_fusion_leaves_frozen_branches_exactly_as_trained(tmp_path):
    """Partial mode, the paper's fusion on frozen branches: training the fusion changes no tensor
    of the transferred US backbone, BatchNorm running statistics included."""
    manifest = read_manifest(write_tiny_cohort(tmp_path / "data", n_cases=12, size=40))
    model = tiny_model_config(backbone=BackboneConfig(name="resnet18", weights="none", frozen="layer2",
                                                      image_size=32))
    train = TrainConfig(mode="partial", epochs=2, batch_size=8, feature_copies=1, activation_dtype="fp32",
                        cache_dir=str(tmp_path / "cache"))
    rows = [RunConfig(name=name, model=type(model)(**{**model.__dict__, "modalities": mods}), train=train,
                      cv=CVConfig(folds=3, test_folds=1)) for name, mods in (("US", ["US"]), ("MM", ["MG", "US"]))]
    run_experiment(manifest, rows, tmp_path / "run", progress=False)
    branches = [read_state_dict(f) for f in (tmp_path / "run" / "branches").glob("*.safetensors")]
    us_branches = [{k: v for k, v in s.items() if k.startswith("us_backbone.")} for s in branches
                   if any(k.startswith("us_backbone.") for k in s)]
    assert len(us_branches) == 3
    for fold in range(3):
        mm = read_state_dict(tmp_path / "run" / "rows" / "MM" / "folds" / f"fold_{fold}" / "model.safetensors")
        mine = {k: v for k, v in mm.items() if k.startswith("us_backbone.")}
        assert any(mine.keys() == b.keys() and all(torch.equal(mine[k], b[k]) for k in b) for b in us_branches)
        # the fusion trained on the branches' pooled features, computed once per image and copy
        # (Trainer.frozen_branch_features); the fold's test split, predicted afterwards through the
        # branches' later stages from the cached activations, gives the score training selected by
        fold_dir = tmp_path / "run" / "rows" / "MM" / "folds" / f"fold_{fold}"
        fit = json.loads((fold_dir / "fit.json").read_text())
        test = pd.read_csv(fold_dir / "test_predictions.csv")
        again = macro_auc(test["label"].to_numpy(int), test[["p_normal", "p_benign", "p_malignant"]].to_numpy(float))
        assert abs(again - fit["best_test_score"]) < 1e-6, (again, fit["best_test_score"])


def test_large_images_go_through_the_backbone_a_few_at_a_time_with_the_same_activations(tmp_path):
    """A pass takes as many pixels as `batch_size` images of 224 px (never more images than
    `batch_size`): memory stays bounded at 512 px; the activations do not depend on the batch."""
    from breastfusion.training.features import images_per_pass

    assert [images_per_pass(32, s) for s in (128, 224, 512, 1024, 4096)] == [32, 32, 6, 1, 1]
    bb = BackboneConfig(name="resnet18", weights="none", frozen="layer2", image_size=32)
    cfg, instances, net, cache, source, records = _setup(tmp_path, bb, 32)
    seen = []
    hook = net.us_backbone.net.conv1.register_forward_hook(lambda m, args, out: seen.append(len(out)))
    us = [r for r in records if r.modality is Modality.US]
    whole = _store(tmp_path / "whole", bb, cache, "layer2").features(us, backbone=net.us_backbone,
                                                                      batch_size=32, progress=False)
    assert seen == [2 * len(us)]  # (1 + 1 copy) per image, all in one pass
    seen.clear()
    bb_big = BackboneConfig(name="resnet18", weights="none", frozen="layer2", image_size=896)  # (sizes count)
    store = FeatureStore(tmp_path / "small", bb_big, cache, Augment(), copies=1, stage="layer2", dtype="fp32")
    few = store.features(us, backbone=net.us_backbone, batch_size=32, progress=False)
    hook.remove()
    assert max(seen) <= images_per_pass(32, 896) == 2 and len(seen) == len(us)
    for p in whole:
        np.testing.assert_allclose(few[p], whole[p], rtol=0, atol=1e-5)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_stored_activations_hold_no_memory_map_between_reads(tmp_path):
    """Activations are read from the cache when indexed; no map of a cache file stays open (one
    would count every page an epoch touched as the process's memory, once per row)."""
    bb = BackboneConfig(name="resnet18", weights="none", frozen="layer2", image_size=32)
    cfg, instances, net, cache, source, records = _setup(tmp_path, bb, 32)
    us = [r for r in records if r.modality is Modality.US]
    store = _store(tmp_path, bb, cache, "layer2")
    store.features(us, backbone=net.us_backbone, progress=False)  # computed and written
    acts = _store(tmp_path, bb, cache, "layer2").features(us, progress=False)  # read back from disk
    first = next(iter(acts.values()))
    row, whole = first[1], np.asarray(first, dtype=np.float32)
    assert first.shape == whole.shape and len(first) == 2 and np.array_equal(row, whole[1])
    assert str(store.dir) not in Path("/proc/self/maps").read_text()


def test_backbone_lr_scale_puts_only_the_pretrained_layers_in_a_slower_group(tmp_path):
    """train.backbone_lr_scale: the trainable stages of the pretrained networks learn at lr x scale;
    the heads and the (new) attention pooling at lr. At scale 1: one group, as before."""
    bb = BackboneConfig(name="resnet18", weights="none", frozen="layer3", image_size=32, pooling="attention")
    cfg = tiny_model_config(backbone=bb)
    net = BreastFusionNet(cfg)
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    layer4 = {id(p) for b in (net.mg_backbone, net.us_backbone) for p in b.net.layer4.parameters()}
    assert layer4 and layer4 < trainable
    one = make_optimizer(net, TrainConfig(lr=1e-3))
    assert len(one.param_groups) == 1 and {id(p) for p in one.param_groups[0]["params"]} == trainable
    two = make_optimizer(net, TrainConfig(lr=1e-3, optimizer="adamw", backbone_lr_scale=0.1))
    head, slow = two.param_groups
    assert head["lr"] == 1e-3 and slow["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in slow["params"]} == layer4
    assert {id(p) for p in head["params"]} == trainable - layer4
    pools = {id(p) for b in (net.mg_backbone, net.us_backbone) for p in b.attention_pool.parameters()}
    assert pools and pools <= {id(p) for p in head["params"]}
