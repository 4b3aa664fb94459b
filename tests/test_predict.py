"""Export a bundle from a cross-validated row, load it safely, predict new patients."""

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from breastfusion.config import BackboneConfig, CVConfig, RunConfig, TrainConfig
from breastfusion.errors import WeightsError
from breastfusion.evaluation.aggregate import PROBA_COLUMNS
from breastfusion.evaluation.calibration import calibrated_patients
from breastfusion.evaluation.decision import RECALL, REVIEW, ROUTINE, decide
from breastfusion.experiment import run_experiment
from breastfusion.explain.gradcam import explain_instance
from breastfusion.inference.batches import instance_batch
from breastfusion.inference.images import image_source
from breastfusion.inference.instances import build_instances
from breastfusion.inference.layout import MODEL_FILE, PREDICTIONS_FILE, fold_dirs, fold_number
from breastfusion.inference.networks import trained_net
from breastfusion.inference.runtime import pick_device
from breastfusion.models.weights import read_state_dict
from breastfusion.predict.bundle import export_bundle, load_bundle
from breastfusion.predict.run import ensemble_logits, naive_probabilities, predict, predict_batch, write_prediction
from breastfusion.records import read_manifest
from breastfusion.vocab import Modality

from conftest import tiny_model_config, write_tiny_cohort


def _row(tmp_path, modalities=("MG", "US")):
    model = tiny_model_config(modalities=list(modalities),
                              backbone=BackboneConfig(name="resnet18", weights="none", frozen="all", image_size=32))
    train = TrainConfig(mode="cached", epochs=2, batch_size=8, feature_copies=1, cache_dir=str(tmp_path / "cache"))
    return RunConfig(name="MM", model=model, train=train, cv=CVConfig(folds=3, test_folds=1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-fold MM run on a tiny cohort, and its bundle."""
    tmp = tmp_path_factory.mktemp("trained")
    manifest = read_manifest(write_tiny_cohort(tmp / "data", n_cases=12))
    cfg = _row(tmp)
    run_experiment(manifest, [cfg], tmp / "run", progress=False)
    bundle_dir = export_bundle(tmp / "run" / "rows" / "MM", tmp / "bundle")
    return manifest, tmp / "run" / "rows" / "MM", bundle_dir, tmp


def test_every_fold_saves_its_network_and_test_split_logits(trained):
    _, row_dir, _, _ = trained
    folds = fold_dirs(row_dir)
    assert [d.name for d in folds] == ["fold_0", "fold_1", "fold_2"]
    for d in folds:
        test = pd.read_csv(d / "test_predictions.csv")
        assert {"logit_normal", "logit_benign", "logit_malignant", "p_malignant"} <= set(test.columns)
        assert read_state_dict(d / MODEL_FILE)  # safetensors, readable without pickle


def test_fold_folders_are_numbered_and_anything_else_is_refused(tmp_path):
    assert fold_number(tmp_path / "fold_12") == 12
    for name in ("fold_", "fold_x", "folds", "checkpoint_3"):
        with pytest.raises(ValueError, match="not a fold folder"):
            fold_number(tmp_path / name)


def test_bundle_round_trip_reproduces_the_fold_networks(trained):
    manifest, row_dir, bundle_dir, tmp = trained
    bundle = load_bundle(bundle_dir)
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    assert meta["classes"] == ["normal", "benign", "malignant"] and len(meta["temperatures"]) == 3
    assert meta["training_data"]["cases"] == 12 and "operating_points" in meta
    check_evidence(meta, bundle, row_dir)
    instances, _ = build_instances(manifest.cases().values(), bundle.config.model.modality_set,
                                   bundle.config.model.slots)
    source = image_source(bundle.config)
    got = bundle.probabilities(ensemble_logits(bundle, instances, source, pick_device("cpu")))
    # the same ensemble straight from the run's fold files
    cfg = bundle.config
    direct = []
    for d in fold_dirs(row_dir):
        net = trained_net(cfg, read_state_dict(d / MODEL_FILE), backbones_from_config=True)
        with torch.no_grad():
            direct.append(np.stack([net(instance_batch(i, source)).logits[0].numpy() for i in instances]))
    np.testing.assert_allclose(got, bundle.probabilities(direct), atol=1e-6)
    again = load_bundle(bundle_dir)
    np.testing.assert_array_equal(got, again.probabilities(ensemble_logits(again, instances, source,
                                                                           pick_device("cpu"))))


def check_evidence(meta, bundle, row_dir):
    """bundle.json's figures for the operating points: on the validation folds they are the
    shares of `decide`'s calls on the temperature-scaled validation patients, inside their intervals."""
    evidence = meta["operating_point_evidence"]["validation folds"]
    patients = pd.concat([calibrated_patients(pd.read_csv(d / PREDICTIONS_FILE), t)
                          for d, t in zip(fold_dirs(row_dir), bundle.temperatures, strict=True)])
    calls = [decide(p, bundle.points) for p in patients[PROBA_COLUMNS].to_numpy(float)]
    assert evidence["n"] == len(patients) == 12
    for lane, key in ((RECALL, "recall_share"), (ROUTINE, "routine_share"), (REVIEW, "review_share")):
        f = evidence[key]
        assert f["value"] == pytest.approx(np.mean([c == lane for c in calls]))
        assert f["low"] <= f["value"] <= f["high"]
    assert "test splits (where the thresholds were chosen)" in meta["operating_point_evidence"]


def test_mg_once_matches_naive_pairing_and_encodes_each_mg_image_once(trained):
    manifest, _, bundle_dir, _ = trained
    bundle = load_bundle(bundle_dir)
    instances, _ = build_instances(manifest.cases().values(), bundle.config.model.modality_set,
                                   bundle.config.model.slots)
    source = image_source(bundle.config)
    mg_backbones = {id(net.mg_backbone): net.mg_backbone for net in bundle.nets}
    assert len(mg_backbones) == 1  # frozen in training: one module shared by every fold network
    seen = []
    (backbone,) = mg_backbones.values()
    handle = backbone.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    try:
        fast = bundle.probabilities(ensemble_logits(bundle, instances, source, pick_device("cpu")))
        n_fast = sum(seen)
        seen.clear()
        slow = naive_probabilities(bundle, instances, source)
        n_slow = sum(seen)
    finally:
        handle.remove()
    distinct_mg = {r.path for i in instances for r in i.mg if r is not None}
    assert n_fast == len(distinct_mg) == 12 * 4
    assert n_slow == 3 * 2 * len(distinct_mg)  # 3 folds x 2 instances per case x every view
    np.testing.assert_allclose(fast, slow, atol=1e-5)


def test_tampered_or_pickled_weights_are_refused(trained, tmp_path):
    import shutil

    _, _, bundle_dir, _ = trained
    bad = tmp_path / "bad"
    shutil.copytree(bundle_dir, bad)
    weights = bad / "weights" / "fold_0.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="checksum"):
        load_bundle(bad)

    class Smuggler:
        def __reduce__(self):
            return (print, ("pickle executed",))

    weights.write_bytes(pickle.dumps({"x": Smuggler()}))
    meta = json.loads((bad / "bundle.json").read_text())
    from breastfusion.files import sha256_file

    meta["sha256"]["weights/fold_0.safetensors"] = sha256_file(weights)  # a consistent but evil bundle
    (bad / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="not a loadable weights file"):
        load_bundle(bad)

    shutil.rmtree(bad)
    shutil.copytree(bundle_dir, bad)
    cfg = bad / "config.yaml"
    cfg.write_text(cfg.read_text().replace("fusion: concat", "fusion: cross_attention"))
    with pytest.raises(WeightsError, match="config.yaml: checksum"):
        load_bundle(bad)


def test_gradcam_maps_every_image_and_releases_its_hooks(trained):
    manifest, _, bundle_dir, _ = trained
    bundle = load_bundle(bundle_dir)
    net = bundle.nets[0]
    cfg = bundle.config
    instances, _ = build_instances(manifest.cases().values(), cfg.model.modality_set, cfg.model.slots)
    batch = instance_batch(instances[0], image_source(cfg))
    exp = explain_instance(net, batch, list(cfg.model.slots))
    assert set(exp.mg) == {"CC-2D", "MLO-2D", "CC-synthesized", "MLO-synthesized"}
    for heat in [*exp.mg.values(), exp.us]:
        assert heat.shape == (32, 32) and heat.min() >= 0 and heat.max() <= 1
    assert exp.class_index == int(np.argmax(exp.logits))
    for m in (net.mg_backbone, net.us_backbone):
        assert not m.cam_layer._forward_hooks and not m.cam_layer._backward_hooks


def test_predict_writes_tables_reports_heatmaps_and_worklist(trained, tmp_path):
    manifest, _, bundle_dir, _ = trained
    bundle = load_bundle(bundle_dir)
    pred = predict(manifest, bundle, cache_dir=bundle.config.train.cache_dir, progress=False)
    out = write_prediction(pred, bundle, tmp_path / "out", save_arrays=True)
    patients = pd.read_csv(out / "predictions.csv")
    assert len(patients) == 12 and set(patients["decision"]) <= {"recall: suspected malignant", "routine: normal",
                                                                 "review"}
    np.testing.assert_allclose(patients[["p_normal", "p_benign", "p_malignant"]].sum(axis=1), 1, atol=1e-5)
    assert len(pd.read_csv(out / "instances.csv")) == 24
    summary = json.loads((out / "predictions.json").read_text())
    assert len(summary["patients"]) == 12 and summary["operating_points"]
    reports = sorted((out / "reports").glob("*.html"))
    assert len(reports) == 12
    assert len(list((out / "heatmaps").rglob("*.png"))) == 12 * (4 + 2)
    assert len(list((out / "heatmaps").rglob("*.npy"))) == 12 * (4 + 2)
    worklist = pd.read_csv(out / "worklist.csv")
    assert list(worklist["p_malignant"]) == sorted(worklist["p_malignant"], reverse=True)


def test_cli_export_then_predict_a_dicom_study_folder_without_leaking_phi(trained, tmp_path):
    """A new patient's DICOM study (CC + MLO 2D, no C-View, two US images) through the CLI:
    missing views are masked, outputs exist, and no identifying tag value appears in any of them."""
    from click.testing import CliRunner

    from breastfusion.cli import main

    from dicom_files import PHI_MARKERS, US_SOP, write_dicom

    _, row_dir, _, _ = trained
    bundle = tmp_path / "bundle"
    out = CliRunner().invoke(main, ["export", str(row_dir), "-o", str(bundle), "--onnx"])
    assert out.exit_code == 0, out.output
    assert "on the validation folds (12 patients; 95% intervals" in out.output and "patients to review" in out.output
    assert f"ONNX: 5 graphs in {bundle / 'onnx'}" in out.output
    rng = np.random.default_rng(5)

    def grey():
        return (rng.random((40, 40)) * 4000).astype(np.uint16)

    study = tmp_path / "study"
    write_dicom(study / "cc.dcm", grey(), patient="NEW-1", ImageLaterality="R", ViewPosition="CC")
    write_dicom(study / "mlo.dcm", grey(), patient="NEW-1", ImageLaterality="R", ViewPosition="MLO")
    for k in range(2):
        write_dicom(study / f"us{k}.dcm", (rng.random((40, 40)) * 255).astype(np.uint8), sop_class=US_SOP,
                    modality="US", patient="NEW-1", Laterality="R")
    result = tmp_path / "pred"
    out = CliRunner().invoke(main, ["predict", str(study), "--model", str(bundle), "-o", str(result),
                                    "--cache-dir", str(tmp_path / "cache")])
    assert out.exit_code == 0, out.output
    patients = pd.read_csv(result / "predictions.csv")
    assert list(patients["case_id"]) == ["NEW-1:R"] and patients["n_instances"].tolist() == [2]
    report = (result / "reports" / "NEW-1_R.html").read_text()
    assert "CC-synthesized view missing" in report and "not a medical device" in report.lower()
    assert (result / "worklist.html").is_file() and (result / "predictions.json").is_file()
    # provenance: the command, version, commit and time in the bundle and in the prediction
    made = json.loads((bundle / "bundle.json").read_text())["provenance"]
    assert made["command"].startswith("breastfusion export") and made["git_commit"] and made["created"]
    told = json.loads((result / "predictions.json").read_text())["provenance"]
    assert told["command"].startswith("breastfusion predict") and told["breastfusion_version"]
    log = (result / "breastfusion.log").read_text()
    assert "INFO breastfusion.predict.run: predicting 1 patient(s), 4 image(s)" in log
    assert len(list((result / "heatmaps").rglob("*.png"))) == 2 + 2
    for file in result.rglob("*"):
        if file.is_file():
            text = file.read_bytes().decode("latin-1")
            assert not [m for m in PHI_MARKERS if m in text], file
    for m in PHI_MARKERS:
        assert m not in out.output


# -- long batches and visible fallbacks (issue 16) ----------------------------------------------


def _flagged_cohort(root):
    """The tiny cohort with one blank mammogram (whole image kept) and one colour mammogram (greyed)."""
    manifest = read_manifest(write_tiny_cohort(root, n_cases=6, seed=3))
    cases = manifest.cases()
    blank, colour = next(iter(cases["P000:L"].mg.values())), next(iter(cases["P001:L"].mg.values()))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(blank.path)  # P000 CC-2D: nothing to crop
    Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)).save(colour.path)
    return manifest


def test_fallbacks_are_flagged_in_instances_reports_and_summary(trained, tmp_path):
    _, _, bundle_dir, _ = trained
    bundle = load_bundle(bundle_dir)
    manifest = _flagged_cohort(tmp_path / "data")
    out = tmp_path / "out"
    pred = predict_batch(manifest, bundle, out, cache_dir=tmp_path / "cache", heatmaps=False, progress=False)
    instances = pd.read_csv(out / "instances.csv").fillna("")
    notes = dict(zip(instances["case_id"], instances["notes"], strict=False))
    assert notes["P000:L"] == "CC-2D: whole image kept (no breast or scan area found)"
    assert notes["P001:L"] == "CC-2D: colour image converted to grey"
    assert notes["P002:L"] == ""
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["preprocessing_notes"] == {"colour image converted to grey": 1,
                                              "whole image kept (no breast or scan area found)": 1}
    assert pred.note_counts() == summary["preprocessing_notes"]
    page = (out / "reports" / "P000_L.html").read_text()
    assert "CC-2D: whole image kept" in page
    assert "CC-2D: colour image converted to grey" in (out / "worklist.csv").read_text()


def test_a_failing_patient_is_reported_and_the_batch_goes_on(trained, tmp_path, monkeypatch):
    from breastfusion.predict import run

    _, _, bundle_dir, _ = trained
    bundle = load_bundle(bundle_dir)
    manifest = read_manifest(write_tiny_cohort(tmp_path / "data", n_cases=6, seed=4))
    real = run._panels

    def panels(bundle, items, *args):
        if items[0].case_id == "P002:L":
            raise RuntimeError("a study this code cannot explain")
        return real(bundle, items, *args)

    monkeypatch.setattr(run, "_panels", panels)
    out = tmp_path / "out"
    pred = predict_batch(manifest, bundle, out, cache_dir=tmp_path / "cache", progress=False, chunk_size=4)
    assert pred.failed == {"P002:L": "RuntimeError: a study this code cannot explain"}
    assert sorted(pd.read_csv(out / "predictions.csv")["case_id"]) == ["P000:L", "P001:L", "P003:L", "P004:L",
                                                                       "P005:L"]
    assert json.loads((out / "predictions.json").read_text())["failed_patients"] == pred.failed


def test_an_interrupted_batch_resumes_without_redoing_finished_patients(trained, tmp_path, monkeypatch):
    from breastfusion.predict import run

    _, _, bundle_dir, _ = trained
    bundle = load_bundle(bundle_dir)
    manifest = read_manifest(write_tiny_cohort(tmp_path / "data", n_cases=7, seed=5))
    cache = tmp_path / "cache"
    whole = predict(manifest, bundle, cache_dir=cache, heatmaps=False, progress=False)
    real, calls = run.predict_cases, []

    class Stopped(Exception):
        """Stands for the batch being killed (kill -9 or Ctrl-C) during its third chunk."""

    def stop_after_two(cases, *args, **kwargs):
        calls.append([c.case_id for c in cases])
        if len(calls) == 3 and stop_after_two.armed:
            raise Stopped
        return real(cases, *args, **kwargs)

    stop_after_two.armed = True

    monkeypatch.setattr(run, "predict_cases", stop_after_two)
    out = tmp_path / "out"
    with pytest.raises(Stopped):
        predict_batch(manifest, bundle, out, cache_dir=cache, heatmaps=False, progress=False, chunk_size=2)
    assert not (out / "predictions.csv").exists() and len(list((out / ".partial").glob("chunk-*.json"))) == 2
    calls.clear()
    stop_after_two.armed = False
    pred = predict_batch(manifest, bundle, out, cache_dir=cache, heatmaps=False, progress=False, chunk_size=2)
    assert [c for chunk in calls for c in chunk] == ["P004:L", "P005:L", "P006:L"]  # only what was left
    assert not (out / ".partial").exists()
    got = pd.read_csv(out / "predictions.csv").set_index("case_id").sort_index()
    ref = whole.patients.set_index("case_id").sort_index()
    np.testing.assert_allclose(got[PROBA_COLUMNS].to_numpy(), ref[PROBA_COLUMNS].to_numpy(), atol=1e-6)
    assert list(got["decision"]) == list(ref["decision"]) and len(pred.patients) == 7
    # a journal of another bundle is not trusted
    (out / ".partial").mkdir()
    (out / ".partial" / "fingerprint.json").write_text('{"bundle": "another"}')
    (out / ".partial" / "chunk-0.json").write_text("{}")
    calls.clear()
    predict_batch(manifest, bundle, out, cache_dir=cache, heatmaps=False, progress=False, chunk_size=4)
    assert len([c for chunk in calls for c in chunk]) == 7


def test_backbones_only_see_a_few_batch_sizes_and_every_image_once(trained):
    """Long batches: remainders are cut in powers of two (inference.batches.bounded_spans), so the
    per-shape state of oneDNN / ONNX Runtime stays bounded (docs/reliability.md, Long batches)."""
    from breastfusion.inference.batches import bounded_spans
    from breastfusion.predict.run import FeatureBank

    for n in range(70):
        spans = bounded_spans(n, 12)
        assert [i for a, b in spans for i in range(a, b)] == list(range(n))
        assert {b - a for a, b in spans} <= {12, 8, 4, 2, 1}
    manifest, _, bundle_dir, _ = trained
    bundle = load_bundle(bundle_dir)
    backbone = bundle.nets[0].backbone(Modality.US)
    records = [r for r in manifest.records if r.modality is Modality.US][:23]
    sizes = []
    hook = backbone.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    try:
        bank = FeatureBank(image_source(bundle.config, bundle.config.train.cache_dir), torch.device("cpu"),
                           bundle.config.train, batch_size=8)
        bank.encode(backbone, records)
    finally:
        hook.remove()
    assert sizes == [8, 8, 4, 2, 1] and all(bank.get(backbone, r.path).isfinite().all() for r in records)


def test_a_batch_into_an_output_folder_another_process_writes_is_refused_before_writing(trained, tmp_path):
    from breastfusion.errors import RunLockedError
    from breastfusion.locks import RunLock

    manifest, _, bundle_dir, _ = trained
    bundle, out = load_bundle(bundle_dir), tmp_path / "out"
    with RunLock(out, "breastfusion predict first/"):
        with pytest.raises(RunLockedError, match=r"in use by pid \d+ \(command breastfusion predict first/"):
            predict_batch(manifest, bundle, out, heatmaps=False, progress=False)
        assert sorted(p.name for p in out.iterdir()) == [".breastfusion.lock"]
    pred = predict_batch(manifest, bundle, out, cache_dir=bundle.config.train.cache_dir, heatmaps=False,
                         progress=False)  # released: the next batch writes
    assert len(pred.patients) == 12 and not (out / ".breastfusion.lock").exists()


# -- ONNX Runtime and int8 backbones (issue 17) -------------------------------------------------


@pytest.fixture(scope="module")
def onnx_bundle(trained, tmp_path_factory):
    """The trained bundle plus its fp32 ONNX graphs and int8 backbones (AUC measurement left out: slow)."""
    import shutil

    from breastfusion.predict.int8 import export_int8
    from breastfusion.predict.onnx import export_onnx

    manifest, row_dir, bundle_dir, _ = trained
    out = tmp_path_factory.mktemp("onnx") / "bundle"
    shutil.copytree(bundle_dir, out)
    export_onnx(out)
    export_int8(out, row_dir, manifest, images=16, measure=False)
    return out


@pytest.fixture(scope="module")
def torch_prediction(trained):
    """What the PyTorch runtime predicts for the tiny cohort (no heatmaps)."""
    manifest, _, bundle_dir, _ = trained
    bundle = load_bundle(bundle_dir)
    return predict(manifest, bundle, cache_dir=bundle.config.train.cache_dir, heatmaps=False, progress=False)


def test_onnx_graphs_predict_what_pytorch_predicts_encoding_mg_once(trained, onnx_bundle, torch_prediction,
                                                                    monkeypatch):
    from breastfusion.files import sha256_file
    from breastfusion.predict import onnx

    manifest = trained[0]
    bundle = load_bundle(onnx_bundle, networks=False)
    cfg = bundle.config
    instances, _ = build_instances(manifest.cases().values(), cfg.model.modality_set, cfg.model.slots)
    source, cpu = image_source(cfg), pick_device("cpu")
    assert list(torch_prediction.instances["instance_id"]) == [i.instance_id for i in instances]
    reference = torch_prediction.instances[PROBA_COLUMNS].to_numpy(float)
    read = []
    real = onnx.OnnxFeatureBank._images
    monkeypatch.setattr(onnx.OnnxFeatureBank, "_images", lambda self, recs, cl: read.append(len(recs)) or
                        real(self, recs, cl))
    got = bundle.probabilities(ensemble_logits(bundle, instances, source, cpu, "onnx"))
    np.testing.assert_allclose(got, reference, atol=1e-4)
    assert sum(read) == 12 * 4 + 12 * 2  # each image once: the frozen backbones are one graph for every fold
    meta = json.loads((onnx_bundle / "bundle.json").read_text())["onnx"]
    assert [set(e) for e in meta["folds"]] == [{"MG", "US", "head"}] * 3
    assert {e["MG"] for e in meta["folds"]} == {"onnx/mg_backbone.onnx"}
    assert len({e["head"] for e in meta["folds"]}) == 3
    # int8 backbones: they run, stay close on these random networks, are smaller and checksummed
    int8 = bundle.probabilities(ensemble_logits(bundle, instances, source, cpu, "onnx-int8"))
    assert np.abs(int8 - reference).max() < 0.1
    sums = bundle.meta.sha256
    assert len(meta["int8"]["graphs"]) == 2
    assert meta["int8"]["calibration"]["onnx/mg_backbone.int8.onnx"]["images"] == 16
    for fp32, name in meta["int8"]["graphs"].items():
        assert (onnx_bundle / name).stat().st_size < (onnx_bundle / fp32).stat().st_size / 2
        assert sums[name] == sha256_file(onnx_bundle / name) and sums[fp32] == sha256_file(onnx_bundle / fp32)
    # a bundle without graphs says so before any patient
    with pytest.raises(WeightsError, match="no ONNX graphs"):
        predict(manifest, load_bundle(trained[2], networks=False), runtime="onnx", progress=False)


def test_a_modified_or_unlisted_onnx_graph_is_refused(onnx_bundle, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(onnx_bundle, bad)
    graph = bad / "onnx" / "fold_1.head.onnx"
    original = graph.read_bytes()
    bundle = load_bundle(bad, networks=False)
    graph.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    with pytest.raises(WeightsError, match="fold_1.head.onnx: checksum"):  # modified after loading
        ensemble_logits(bundle, [], None, pick_device("cpu"), "onnx")
    with pytest.raises(WeightsError, match="fold_1.head.onnx: checksum"):
        load_bundle(bad)
    graph.write_bytes(original)
    meta_file = bad / "bundle.json"
    meta = json.loads(meta_file.read_text())
    del meta["sha256"]["onnx/us_backbone.int8.onnx"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="checksums do not list exactly"):
        load_bundle(bad)
    meta["onnx"]["folds"][0]["head"] = "weights/fold_0.safetensors"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match="not an ONNX file of the bundle"):
        load_bundle(bad)


def test_cli_predict_on_onnx_runtime_writes_the_same_predictions_without_heatmaps(trained, onnx_bundle,
                                                                                 torch_prediction, tmp_path):
    from click.testing import CliRunner

    from breastfusion.cli import main

    manifest, row_dir, bundle_dir, tmp = trained
    cache = load_bundle(bundle_dir, networks=False).config.train.cache_dir
    ref = torch_prediction.patients
    out = tmp_path / "pred"
    result = CliRunner().invoke(main, ["predict", str(tmp / "data" / "manifest.csv"), "--model", str(onnx_bundle),
                                       "-o", str(out), "--cache-dir", cache, "--runtime", "onnx"])
    assert result.exit_code == 0, result.output
    assert "heatmaps skipped: Grad-CAM runs on the PyTorch runtime only" in result.output
    got = pd.read_csv(out / "predictions.csv")
    assert list(got["case_id"]) == list(ref["case_id"])
    np.testing.assert_allclose(got[PROBA_COLUMNS].to_numpy(), ref[PROBA_COLUMNS].to_numpy(float), atol=1e-4)
    assert list(got["decision"]) == list(ref["decision"]) and list(got["triage_mean"]) == list(ref["triage_mean"])
    assert not (out / "heatmaps").exists()
    assert "heatmaps skipped" in json.loads((out / "predictions.json").read_text())["model"]["runtime"]
    assert "heatmaps skipped" in (out / "reports" / "P000_L.html").read_text()
    # --int8 needs the training manifest
    result = CliRunner().invoke(main, ["export", str(row_dir), "-o", str(tmp_path / "b"), "--int8"])
    assert result.exit_code == 2 and "--calibration-manifest" in result.output


def test_int8_auc_change_calibrates_each_fold_on_its_own_training_images(trained, onnx_bundle, monkeypatch):
    """The measurement's plumbing, with quantisation replaced by a copy (the real one is slow):
    each fold's graphs calibrated on its train split only, its validation patients measured."""
    import shutil

    from breastfusion.errors import CohortError
    from breastfusion.inference.layout import recorded_splits
    from breastfusion.predict import int8

    manifest, row_dir, _, tmp = trained
    calibrated = {}

    def copy(graph, out, reader):
        calibrated[out.name] = {r.case_id for r in reader.records}
        shutil.copyfile(graph, out)
        return out

    monkeypatch.setattr(int8, "quantise", copy)
    monkeypatch.setattr(int8.Calibration, "_prepare", lambda self, graph: self.bundle.root / graph)
    bundle = load_bundle(onnx_bundle, networks=False)
    change = int8.int8_auc_change(bundle, row_dir, manifest, images=8, folds=[1])
    split = recorded_splits(row_dir)[1]
    assert sorted(calibrated) == ["mg_backbone.1.int8.onnx", "us_backbone.1.int8.onnx"]
    for cases in calibrated.values():
        assert cases and cases <= split["train"] and not cases & (split["val"] | split["test"])
    assert change["patients"] == len(split["val"]) == 4 and change["folds"] == [1]
    assert change["largest_probability_change"] < 1e-6 and change["decision_changed"] == 0
    assert all(abs(v) < 1e-9 for v in change["auc_change"].values() if not np.isnan(v))
    # an image preprocessing refuses (a Doppler frame, say) is left out as in training, not read
    first = sorted(split["val"])[0]
    refused = {r.path for r in manifest.records if r.case_id == first and r.modality is Modality.US}
    screen = int8.screen

    def refusing(records, source, progress=True):
        found = screen(records, source, progress)
        found.refused.update({r.path: "colour image" for r in records if r.path in refused})
        return found

    monkeypatch.setattr(int8, "screen", refusing)
    assert int8.int8_auc_change(bundle, row_dir, manifest, images=8, folds=[1])["patients"] == 3
    other = read_manifest(write_tiny_cohort(tmp / "other", n_cases=12, seed=9))
    with pytest.raises(CohortError, match="not the one MM was trained on"):
        int8.int8_auc_change(bundle, row_dir, other)


def test_quantisation_leaves_no_handler_on_the_root_logger():
    """onnxruntime.quantization's `logging.info` installs a root handler (basicConfig) when the
    root has none; every later line of ours was then printed twice."""
    import logging

    from breastfusion.predict import int8

    before = list(logging.getLogger().handlers)
    with int8._quiet():
        logging.getLogger().addHandler(logging.StreamHandler())
    assert logging.getLogger().handlers == before


@pytest.mark.parametrize("variant", [dict(head="plain", arcface=False), dict(fusion="cross_attention"),
                                     dict(modalities=["MG"]), dict(modalities=["US"]), dict(bilateral=True),
                                     dict(head="plain", arcface=False, bilateral=True)],
                         ids=["plain", "cross-attention", "MG-only", "US-only", "bilateral", "plain-bilateral"])
def test_head_graphs_of_other_heads_match_pytorch(variant, tmp_path):
    """The plain head, cross-attention fusion and single-modality heads as ONNX graphs (the
    bundle above has the paper's concat head)."""
    from breastfusion.models.network import build_head
    from breastfusion.predict import onnx
    from breastfusion.predict.onnx import _export, _Head, _head_example

    cfg = tiny_model_config(**variant)
    head = _Head(build_head(cfg, 24)).eval()
    gen = torch.Generator().manual_seed(0)
    dims = dict.fromkeys(cfg.modality_set, 24)
    views = len(cfg.slots)
    _export(head, _head_example(cfg.modality_set, views, dims, 2, 3, gen), head.names,
            {n: {0: "n"} for n in head.names}, tmp_path / "head.onnx")
    example = _head_example(cfg.modality_set, views, dims, 3, 7, gen)
    with torch.no_grad():
        ref = head(*example).numpy()
    got = onnx.session((tmp_path / "head.onnx").read_bytes()).run(
        None, {n: t.numpy() for n, t in zip(head.names, example, strict=True)})[0]
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("layer", ["head", "blocks"])
def test_backbone_graph_with_attention_over_tiles_matches_pytorch(tmp_path, layer):
    """A partial-mode MG encoder whose pooling is attention over 2 x 2 tiles (an odd map side:
    the last tile is partial) exports to ONNX and ONNX Runtime computes what PyTorch does; also
    when it pools the last block's map instead of the head's (feature_layer 'blocks')."""
    from breastfusion.models.backbones import build_backbone
    from breastfusion.predict.onnx import _check, _Encoder, _export

    torch.manual_seed(0)
    bb = build_backbone(BackboneConfig(name="efficientnet_lite0", weights="none", frozen="all", image_size=160,
                                       pooling="attention", attention_cell=2, feature_layer=layer))
    torch.nn.init.normal_(bb.attention_pool.cells.score[0].weight, std=0.5)  # weights far from uniform
    enc = _Encoder(bb, TrainConfig(mode="partial")).eval()
    assert bb.feature_map(torch.rand(1, 1, 160, 160)).shape[-1] == 5  # 5 x 5 cells -> 3 x 3 tiles
    _export(enc, (torch.rand(2, 1, 160, 160),), ["images"], {"images": {0: "n"}}, tmp_path / "mg.onnx")
    assert _check(enc, (torch.rand(3, 1, 160, 160),), ["images"], tmp_path / "mg.onnx") < 1e-3
