"""One precision policy for backbone features (inference/encode.py): a bundle predicts from the
features it was trained on, whatever `train.precision` says. bf16 is allowed on a CPU when asked
for explicitly, so a CPU test can force the mismatch the policy rules out."""

import numpy as np
import pytest
import torch

from breastfusion.config import BackboneConfig, CVConfig, RunConfig, TrainConfig
from breastfusion.experiment import run_experiment
from breastfusion.inference.encode import stored_features, trained_features
from breastfusion.inference.images import image_source
from breastfusion.inference.instances import build_instances
from breastfusion.inference.runtime import autocast
from breastfusion.models.backbones import build_backbone
from breastfusion.predict.bundle import export_bundle, load_bundle
from breastfusion.predict.run import FeatureBank
from breastfusion.records import read_manifest
from breastfusion.training.preparation import stored_representations
from breastfusion.vocab import Modality

from conftest import tiny_model_config, write_tiny_cohort


def _cfg(tmp_path, mode: str, frozen: str) -> RunConfig:
    model = tiny_model_config(modalities=["US"], backbone=BackboneConfig(
        name="efficientnet_lite0", weights="imagenet", frozen=frozen, image_size=64))
    train = TrainConfig(mode=mode, precision="bf16", epochs=1, batch_size=8, feature_copies=1,
                        cache_dir=str(tmp_path / "cache"))
    return RunConfig(name="US", model=model, train=train, cv=CVConfig(folds=3, test_folds=1)).validate()


@pytest.fixture(scope="module")
def cached_bf16(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bf16")
    manifest = read_manifest(write_tiny_cohort(tmp / "data", n_cases=9, size=72, us_per_case=1))
    cfg = _cfg(tmp, "cached", "all")
    run_experiment(manifest, [cfg], tmp / "run", progress=False)
    return manifest, load_bundle(export_bundle(tmp / "run" / "rows" / "US", tmp / "bundle"))


def test_cached_bundle_under_bf16_predicts_from_the_features_training_used(cached_bf16):
    manifest, bundle = cached_bf16
    cfg = bundle.config
    assert cfg.train.precision == "bf16" and cfg.train.mode == "cached"
    instances, _ = build_instances(manifest.cases().values(), cfg.model.modality_set, cfg.model.slots)
    records = [i.us for i in instances]
    source = image_source(cfg)
    trained_on, failed = stored_representations(cfg, source, records, progress=False)  # the training cache
    assert not failed
    bank = FeatureBank(source, torch.device("cpu"), cfg.train)
    backbone = bundle.nets[0].backbone(Modality.US)
    bank.encode(backbone, records)
    for rec in records:  # fp32 both; batch size and thread count move the last digits (1.2e-5 seen)
        np.testing.assert_allclose(bank.get(backbone, rec.path).numpy(), trained_on[rec.path][0], atol=1e-4)
    # what the old FeatureBank computed (the backbone under bf16 autocast) is measurably different:
    # this test fails if prediction computes features in another arithmetic than training did
    images = torch.stack([torch.from_numpy(source.get(r.path, r.modality, r.side)) for r in records]).unsqueeze(1)
    with torch.no_grad(), autocast(torch.device("cpu"), "bf16"):
        bf16 = backbone(images).float().numpy()
    fp32 = np.stack([trained_on[r.path][0] for r in records])
    assert np.abs(bf16 - fp32).max() > 1e-3


def test_partial_mode_features_are_the_tail_of_the_stored_activations(tmp_path):
    """Partial mode: the frozen trunk in fp32, stored in fp16, the trained tail at train.precision."""
    cfg = _cfg(tmp_path, "partial", "layer3")
    backbone = build_backbone(cfg.model.backbone).eval()
    images = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        act = stored_features(backbone, images, "layer3")
        with autocast(torch.device("cpu"), "bf16"):
            as_trained = backbone.tail(act.half().float(), "layer3").float()
        got = trained_features(backbone, images, cfg.train)
    torch.testing.assert_close(got, as_trained, atol=0, rtol=0)
    with torch.no_grad():
        plain = backbone(images)
    assert (got - plain).abs().max() > 0  # the tail really ran in bf16, not fp32
