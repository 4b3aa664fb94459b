"""The bilateral MG branch (models/bilateral.py): each view compared with the same view of the
other breast, through instances, network, training, prediction and ONNX."""

import dataclasses
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from breastfusion.config import BackboneConfig, ConfigError, CVConfig, RunConfig, TrainConfig
from breastfusion.evaluation.aggregate import PROBA_COLUMNS
from breastfusion.experiment import run_experiment
from breastfusion.inference.instances import build_instances
from breastfusion.models.bilateral import bilateral_views
from breastfusion.models.network import BreastFusionNet
from breastfusion.predict.bundle import export_bundle, load_bundle
from breastfusion.predict.run import predict, predict_batch
from breastfusion.records import ImageRecord, read_manifest, write_manifest
from breastfusion.vocab import LABELS, Kind, MGSlot, Modality, Side, View

from conftest import tiny_model_config

OWN = [MGSlot(View.CC, Kind.STANDARD), MGSlot(View.MLO, Kind.STANDARD)]


def _cohort(root, n_patients=12, size=32, seed=0):
    """Patients with both breasts (CC and MLO each), except every fourth, who has only her left
    breast; the right breast of patient 1 lacks its MLO view. Labels per breast."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n_patients):
        pid = f"P{i:02d}"
        sides = (Side.LEFT,) if i % 4 == 0 else (Side.LEFT, Side.RIGHT)
        for side in sides:
            label = LABELS[(i + (side is Side.RIGHT)) % 3]
            for slot in OWN:
                if i == 1 and side is Side.RIGHT and slot.view is View.MLO:
                    continue
                path = root / "img" / f"{pid}_{side.value}_{slot.name}.png"
                Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)).save(path)
                records.append(ImageRecord(pid, side, Modality.MG, str(path), slot.view, slot.kind, label))
    return read_manifest(write_manifest(records, root / "manifest.csv"))


def test_slots_of_the_other_breast_are_named_parsed_and_follow_the_own_slots():
    cfg = tiny_model_config(modalities=["MG"], mg_slots=[s.name for s in OWN], bilateral=True)
    assert [s.name for s in cfg.slots] == ["CC-2D", "MLO-2D", "CC-2D-contralateral", "MLO-2D-contralateral"]
    assert [MGSlot.parse(s.name) for s in cfg.slots] == list(cfg.slots)
    assert pickle.loads(pickle.dumps(cfg.slots)) == cfg.slots  # instances carry slots to fold workers
    assert cfg.slots[2].own == OWN[0] and not OWN[0].contralateral and cfg.slots[2] != OWN[0]
    bad = RunConfig(model=tiny_model_config(mg_slots=["CC-2D", "CC-2D-contralateral"]))
    with pytest.raises(ConfigError, match="bilateral"):
        bad.validate()


def test_instances_take_the_other_breasts_views_and_need_one_of_their_own(tmp_path):
    manifest = _cohort(tmp_path)
    slots = tiny_model_config(mg_slots=[s.name for s in OWN], bilateral=True).slots
    instances, skipped = build_instances(manifest.cases().values(), [Modality.MG], slots)
    by_case = {i.case_id: i for i in instances}
    assert len(instances) == len(manifest.cases()) and not skipped
    left, right = by_case["P01:L"], by_case["P01:R"]
    assert [r.path for r in left.mg[2:] if r] == [right.mg[0].path]  # her right breast has no MLO
    assert left.mg[3] is None and [r.path for r in right.mg[2:]] == [r.path for r in left.mg[:2]]
    assert by_case["P00:L"].mg[2:] == (None, None)  # no other breast
    assert [s for s, _ in left.own_mg] == OWN
    # a breast whose only MG images are of the other breast is not an instance
    cases = list(manifest.cases().values())
    bare = dataclasses.replace(cases[1], mg={})
    instances, skipped = build_instances([cases[0], bare, *cases[2:]], [Modality.MG], slots)
    assert bare.case_id not in {i.case_id for i in instances}
    assert skipped["no MG image in the model's views"] == 1


def test_bilateral_views_compare_each_view_with_its_counterpart():
    feats = torch.randn(2, 4, 3)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    x, own_mask = bilateral_views(feats, mask)
    assert x.shape == (2, 2, 6) and own_mask.tolist() == [[True, True], [True, False]]
    assert torch.equal(x[..., :3], feats[:, :2])
    assert torch.allclose(x[0, 0, 3:], feats[0, 0] - feats[0, 2])
    assert torch.equal(x[0, 1, 3:], torch.zeros(3)) and torch.equal(x[1, :, 3:], torch.zeros(2, 3))
    with pytest.raises(ValueError, match="even"):
        bilateral_views(feats[:, :3], mask[:, :3])


@pytest.mark.parametrize("head", ["paper", "plain"])
def test_the_other_breast_reaches_the_logits_and_a_missing_view_of_it_does_not(head):
    cfg = tiny_model_config(modalities=["MG"], mg_slots=[s.name for s in OWN], bilateral=True, head=head,
                            arcface=head == "paper")
    net = BreastFusionNet(cfg).eval()
    torch.manual_seed(0)
    batch = {"mg": torch.rand(2, 4, 1, 32, 32), "mg_mask": torch.tensor([[True, True, True, False]] * 2)}
    with torch.no_grad():
        out = net(batch)
        changed = dict(batch, mg=batch["mg"].clone())
        changed["mg"][:, 2] = torch.rand(2, 1, 32, 32)  # the other breast's CC
        moved = net(changed).logits
        changed["mg"][:, 3] = torch.rand(2, 1, 32, 32)  # the other breast's MLO: missing
        same = net(changed).logits
    assert out.logits.shape == (2, 3)
    if head == "paper":
        assert out.view_weights.shape == (2, 2)  # weights of the breast's own views
    assert not torch.allclose(moved, out.logits, atol=1e-5)
    assert torch.allclose(same, moved, atol=1e-6)


def test_a_bilateral_mg_row_trains_predicts_and_exports_to_onnx(tmp_path):
    from breastfusion.inference.images import image_source
    from breastfusion.inference.runtime import pick_device
    from breastfusion.predict.onnx import export_onnx
    from breastfusion.predict.run import ensemble_logits

    manifest = _cohort(tmp_path / "data")
    model = tiny_model_config(modalities=["MG"], mg_slots=[s.name for s in OWN], bilateral=True,
                              backbone=BackboneConfig(name="resnet18", weights="none", frozen="all", image_size=32))
    train = TrainConfig(mode="cached", epochs=2, batch_size=8, feature_copies=1, cache_dir=str(tmp_path / "cache"))
    cfg = RunConfig(name="MG-bilateral", model=model, train=train, cv=CVConfig(folds=3, test_folds=1))
    run_experiment(manifest, [cfg], tmp_path / "run", progress=False)
    bundle_dir = export_bundle(tmp_path / "run" / "rows" / "MG-bilateral", tmp_path / "bundle")
    bundle = load_bundle(bundle_dir)
    pred = predict(manifest, bundle, cache_dir=train.cache_dir, progress=False)
    assert len(pred.patients) == len(manifest.cases())
    notes = dict(zip(pred.instances["case_id"], pred.instances["notes"], strict=True))
    assert "MLO-2D-contralateral view missing" in notes["P01:L"]
    panels = {r.case_id: [p.title for p in r.panels] for r in pred.results}
    assert panels["P02:L"] == ["CC-2D", "MLO-2D", "CC-2D-contralateral", "MLO-2D-contralateral"]
    assert panels["P00:L"] == ["CC-2D", "MLO-2D"]
    # one breast at a time (chunks of 1 patient-side): each still finds the other breast
    streamed = predict_batch(manifest, bundle, tmp_path / "streamed", cache_dir=train.cache_dir, heatmaps=False,
                             progress=False, chunk_size=1)
    streamed = streamed.instances.set_index("instance_id").loc[pred.instances["instance_id"]]
    np.testing.assert_allclose(streamed[PROBA_COLUMNS].to_numpy(float),
                               pred.instances[PROBA_COLUMNS].to_numpy(float), atol=1e-6)
    export_onnx(bundle_dir)
    onnx_bundle = load_bundle(bundle_dir, networks=False)
    instances, _ = build_instances(manifest.cases().values(), model.modality_set, model.slots)
    got = onnx_bundle.probabilities(ensemble_logits(onnx_bundle, instances, image_source(bundle.config),
                                                    pick_device("cpu"), "onnx"))
    np.testing.assert_allclose(got, pred.instances[PROBA_COLUMNS].to_numpy(float), atol=1e-4)
