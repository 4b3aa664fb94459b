import numpy as np
import torch
from torch.utils.data import DataLoader

from breastfusion.config import BackboneConfig
from breastfusion.inference.instances import build_instances
from breastfusion.models.network import BreastFusionNet, HeadOnly
from breastfusion.preprocess.pipeline import ImageSource, PreprocessCache, Preprocessor
from breastfusion.records import read_manifest
from breastfusion.training.augment import Augment
from breastfusion.training.data import FeatureInstances, ImageInstances
from breastfusion.training.features import FeatureStore, StoredArray
from breastfusion.vocab import Modality

from conftest import tiny_model_config, write_tiny_cohort


def test_cached_path_gives_fine_tune_logits(tmp_path):
    manifest = read_manifest(write_tiny_cohort(tmp_path, n_cases=4, size=40))
    cfg = tiny_model_config(backbone=BackboneConfig(name="resnet18", weights="none", frozen="all", image_size=32))
    instances, _ = build_instances(manifest.cases().values(), cfg.modality_set, cfg.slots)
    # drop one view of one case, so masking goes through both paths too
    instances[0] = type(instances[0])(**{**instances[0].__dict__, "mg": (None, *instances[0].mg[1:])})
    torch.manual_seed(0)
    net = BreastFusionNet(cfg).eval()
    # one backbone for both modalities, so the cache holds what the net computes
    net.us_backbone = net.mg_backbone
    source = PreprocessCache(tmp_path / "cache", Preprocessor(size=32))
    store = FeatureStore(tmp_path / "cache", cfg.backbone, source, Augment(), copies=2)
    records = [r for i in instances for r in (*i.mg, i.us) if r is not None]
    paths = [r.path for r in records]
    feats = store.features(records, backbone=net.mg_backbone, progress=False)
    assert store.computed == len(set(paths))
    assert all(f.shape == (3, 512) for f in feats.values())
    images = ImageInstances(instances, ImageSource({Modality.MG: source, Modality.US: source}), train=False)
    image_batch = next(iter(DataLoader(images, batch_size=len(instances))))
    feat_batch = next(iter(DataLoader(FeatureInstances(instances, feats, train=False), batch_size=len(instances))))
    with torch.no_grad():
        fine = net(image_batch).logits
        cached = HeadOnly(net.head).eval()(feat_batch).logits
    assert torch.allclose(fine, cached, atol=1e-5), (fine - cached).abs().max()

    # a second store over the same files reads from disk and computes nothing
    again = FeatureStore(tmp_path / "cache", cfg.backbone, source, Augment(), copies=2)
    feats2 = again.features(records, backbone=net.mg_backbone, progress=False)
    assert again.computed == 0
    assert all(np.array_equal(feats[p], feats2[p]) for p in feats)
    # augmented copies differ from the plain image
    some = feats[paths[0]]
    assert not np.allclose(some[0], some[1])


def test_a_stored_array_reads_its_file_and_refuses_to_be_viewed_without_a_copy(tmp_path):
    import pytest

    data = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    np.save(tmp_path / "a.npy", data)
    stored = StoredArray(tmp_path / "a.npy", data.shape, data.dtype)
    assert np.array_equal(stored[1], data[1]) and len(stored) == 2 and stored.ndim == 3
    assert np.asarray(stored, dtype=np.float32).dtype == np.float32
    assert np.array_equal(np.asarray(stored), data)
    with pytest.raises(ValueError, match="without a copy"):
        np.asarray(stored, copy=False)
