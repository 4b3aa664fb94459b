"""Cross-validation end to end on a tiny generated cohort, both training modes."""

import copy
import json
import os

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from breastfusion.config import BackboneConfig, CVConfig, RunConfig, TrainConfig, load_run_config
from breastfusion.evaluation.report import report_markdown
from breastfusion.experiment import run_experiment
from breastfusion.records import read_manifest

from conftest import tiny_model_config, write_tiny_cohort
from cv_checks import check_cv_row


def _rows(tmp_path, mode):
    frozen = "all" if mode == "cached" else "layer3"
    model = tiny_model_config(backbone=BackboneConfig(name="resnet18", weights="none", frozen=frozen, image_size=32))
    train = TrainConfig(mode=mode, epochs=2, batch_size=8, feature_copies=1, cache_dir=str(tmp_path / "cache"))
    rows = []
    for name, mods in (("US", ["US"]), ("MG", ["MG"]), ("MM", ["MG", "US"])):
        m = type(model)(**{**model.__dict__, "modalities": mods})
        rows.append(RunConfig(name=name, model=m, train=train, cv=CVConfig(folds=5, test_folds=1)))
    return rows


@pytest.mark.parametrize("mode", ["cached", "finetune"])
def test_experiment_writes_metrics_report_and_plots(tmp_path, mode):
    manifest = read_manifest(write_tiny_cohort(tmp_path / "data", n_cases=20))
    out = tmp_path / "run"
    metrics = run_experiment(manifest, _rows(tmp_path, mode), out, command="test", progress=False)
    for name in ("metrics.json", "report.md", "roc.png", "confusion.png", "config.yaml", "command.txt"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["US", "MG", "MM"]
    for row in saved["rows"]:
        assert {"name", "modalities", "fusion", "arcface", "folds"} <= set(row)
        assert row["folds"] == 5
        patient = row["patient"]
        for cls in ("normal", "benign", "malignant"):
            assert set(patient["auc"][cls]) >= {"mean", "std"}
        assert set(patient["accuracy"]) >= {"mean", "std"}
        assert sum(map(sum, patient["confusion"])) == 20  # every case validated exactly once
        check_cv_row(out, row, manifest)  # predictions vary; metrics follow from the prediction files
    assert metrics["rows"][0]["fusion"] is None and metrics["rows"][2]["fusion"] == "concat"
    for name in ("US", "MG", "MM"):
        row_dir = out / "rows" / name
        assert (row_dir / "roc.png").is_file() and (row_dir / "predictions_patients.csv").is_file()
        assert load_run_config(row_dir / "config.yaml").name == name  # each row reproducible alone
    report = (out / "report.md").read_text()
    assert "| model | backbone (weights), mode | MG views | ArcFace | AUC normal" in report
    assert f"| US | resnet18 (none), {mode} |" in report
    assert "ECE" in report and (out / "rows" / "MM" / "reliability.png").is_file()
    cal = saved["rows"][2]["calibration"]
    assert len(cal["temperatures"]) == 5 and 0 <= cal["ece_after"] <= 1
    check_statistics(out, saved, report)


def check_statistics(out, saved, report):
    """Pooled figures recomputed from the saved patient predictions; every interval holds its
    value; fusion compared with both single-modality rows on the same patients."""
    for row in saved["rows"]:
        pooled = row["patient"]["pooled"]
        patients = pd.read_csv(out / "rows" / row["name"] / "predictions_patients.csv")
        assert pooled["n"] == len(patients) == 20 and pooled["resamples"] == 2000
        for k, cls in enumerate(("normal", "benign", "malignant")):
            auc = pooled["auc"][cls]
            assert auc["value"] == pytest.approx(roc_auc_score(patients["label"] == k, patients[f"p_{cls}"]))
            assert auc["low"] <= auc["value"] <= auc["high"]
        assert pooled["accuracy"]["value"] == pytest.approx((patients["pred"] == patients["label"]).mean())
    us, mg, mm = (row["preprocessing_notes"] for row in saved["rows"])
    assert us == {} and mg == mm and set(mg) <= {"chest wall found on the side the laterality does not say"}
    flagged = {**saved["rows"][0], "preprocessing_notes": {"whole image kept (no breast or scan area found)": 2}}
    assert "Preprocessing: whole image kept (no breast or scan area found): 2 image(s)." in \
        report_markdown("t", [flagged], {})
    pairs = {(c["a"], c["b"]) for c in saved["statistics"]["comparisons"]}
    assert pairs == {("MM", "US"), ("MM", "MG")}
    assert "## Pooled out-of-fold figures" in report and "## Paired comparisons (same patients)" in report


def test_resume_skips_done_folds_and_gives_identical_metrics(tmp_path):
    manifest = read_manifest(write_tiny_cohort(tmp_path / "data", n_cases=20))
    rows = _rows(tmp_path, "cached")[2:]
    out = tmp_path / "run"
    first = run_experiment(manifest, rows, out, progress=False)
    folds = out / "rows" / "MM" / "folds"
    kept = folds / "fold_1" / "predictions.csv"
    stamp = kept.stat().st_mtime_ns
    os.remove(folds / "fold_3" / "predictions.csv")  # as if interrupted before fold 3 finished
    second = run_experiment(manifest, rows, out, progress=False)
    assert kept.stat().st_mtime_ns == stamp  # not rerun
    assert (folds / "fold_3" / "predictions.csv").is_file()
    assert first["rows"][0]["patient"] == second["rows"][0]["patient"]
    # and a fresh run with the same seed reproduces the metrics exactly
    third = run_experiment(manifest, rows, tmp_path / "again", progress=False)
    assert third["rows"][0]["patient"] == first["rows"][0]["patient"]


def test_refused_doppler_image_is_dropped_with_its_reason_and_the_run_goes_on(tmp_path):
    import numpy as np
    from PIL import Image

    manifest = read_manifest(write_tiny_cohort(tmp_path / "data", n_cases=20))
    doppler = next(r for r in manifest.records if r.modality.value == "US")
    rgb = np.stack([np.asarray(Image.open(doppler.path))] * 3, axis=-1)
    rgb[4:20, 4:20] = (255, 0, 0)  # a colour-flow patch
    Image.fromarray(rgb).save(doppler.path)
    rows = _rows(tmp_path, "cached")[:1]  # US only
    metrics = run_experiment(manifest, rows, tmp_path / "run", progress=False)
    row = metrics["rows"][0]
    assert row["refused_images"] == 1
    assert row["excluded"] == {"instance: US image refused by preprocessing": 1}
    refused = json.loads((tmp_path / "run" / "rows" / "US" / "refused_images.json").read_text())
    assert list(refused) == [doppler.path] and "colour" in refused[doppler.path].lower()
    assert sum(map(sum, row["patient"]["confusion"])) == 20  # the case keeps its other US image
    instances = check_cv_row(tmp_path / "run", row, manifest)
    stem = doppler.path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    assert len(instances) == 39 and not instances["instance_id"].str.endswith(f"#{stem}").any()


def test_plain_habib_head_row_cross_validates(tmp_path):
    manifest = read_manifest(write_tiny_cohort(tmp_path / "data", n_cases=20))
    row = _rows(tmp_path, "cached")[2]
    row.name = "plain head MM"
    row.model.head, row.model.arcface = "plain", False
    metrics = run_experiment(manifest, [row], tmp_path / "run", progress=False)
    assert sum(map(sum, metrics["rows"][0]["patient"]["confusion"])) == 20
    check_cv_row(tmp_path / "run", metrics["rows"][0], manifest)


def test_rows_share_trained_branches_without_changing_any_result(tmp_path, monkeypatch):
    """The MM row loads the US and MG networks the single rows trained (same fold, same
    splits) instead of training them again, and its metrics are those of a run alone."""
    import breastfusion.training.fold as fold

    calls = []
    real_fit = fold.fit
    monkeypatch.setattr(fold, "fit", lambda *a, **k: calls.append(k.get("desc")) or real_fit(*a, **k))
    manifest = read_manifest(write_tiny_cohort(tmp_path / "data", n_cases=20))
    cross = copy.deepcopy(_rows(tmp_path, "cached")[2])
    cross.name, cross.model.fusion, cross.model.l2_normalize = "MM cross", "cross_attention", True
    together = run_experiment(manifest, _rows(tmp_path, "cached") + [cross], tmp_path / "all", progress=False)
    # 5 folds x (US, MG, concat fusion, cross-attention fusion): both MM rows took their branches
    # from the memo (fusion-only fields do not name a different single-modality network)
    assert len(calls) == 20
    assert len(list((tmp_path / "all" / "branches").glob("*.safetensors"))) == 10
    calls.clear()
    alone = run_experiment(manifest, _rows(tmp_path, "cached")[2:], tmp_path / "alone", progress=False)
    assert len(calls) == 15  # 5 folds x (US branch, MG branch, fusion)
    for level in ("instance", "patient", "patient_mean"):  # NaN-aware equality via JSON
        assert json.dumps(alone["rows"][0][level]) == json.dumps(together["rows"][2][level])


def test_row_without_obtainable_weights_is_reported_not_run(tmp_path, monkeypatch):
    """GoogLeNet's ImageNet weights cannot be had offline: the row says so, the others run."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    manifest = read_manifest(write_tiny_cohort(tmp_path / "data", n_cases=20))
    rows = _rows(tmp_path, "cached")[:1]
    google = copy.deepcopy(rows[0])
    google.name, google.model.backbone.name, google.model.backbone.weights = "GoogLeNet US", "googlenet", "imagenet"
    metrics = run_experiment(manifest, rows + [google], tmp_path / "run", progress=False)
    assert "patient" in metrics["rows"][0]
    skipped = metrics["rows"][1]
    assert "patient" not in skipped and "googlenet" in skipped["not_run"] and "never downloads" in skipped["not_run"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| GoogLeNet US | googlenet (imagenet), cached | - | yes | not run" in report



def test_parallel_folds_give_the_results_of_sequential_folds(tmp_path):
    """--jobs 2: folds trained in two worker processes, each with its share of the threads,
    both reading the one feature cache. (Which training mode runs inside a worker does not
    touch the fold scheduling; fine-tune mode's folds are checked end to end above.)"""
    manifest = read_manifest(write_tiny_cohort(tmp_path / "data", n_cases=20))
    rows = _rows(tmp_path, "cached")[2:]
    rows[0].cv.folds, rows[0].train.epochs = 3, 1
    one = run_experiment(manifest, rows, tmp_path / "one", progress=False)
    two = run_experiment(manifest, copy.deepcopy(rows), tmp_path / "two", progress=False, jobs=2)
    a, b = one["rows"][0], two["rows"][0]
    for level in ("instance", "patient"):
        for cls, auc in a[level]["auc"].items():
            assert b[level]["auc"][cls]["mean"] == pytest.approx(auc["mean"], abs=1e-6), (level, cls)
        assert b[level]["confusion"] == a[level]["confusion"]
    for fold in range(3):
        p1 = (tmp_path / "one" / "rows" / "MM" / "folds" / f"fold_{fold}" / "predictions.csv").read_text()
        p2 = (tmp_path / "two" / "rows" / "MM" / "folds" / f"fold_{fold}" / "predictions.csv").read_text()
        assert p1.splitlines()[0] == p2.splitlines()[0] and len(p1.splitlines()) == len(p2.splitlines())


def test_parallel_fold_workers_get_one_gpu_each_when_there_are_several(monkeypatch):
    import torch

    from breastfusion.training.execution import fold_devices

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert fold_devices(3) == ["cuda:0", "cuda:1", "cuda:0"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert fold_devices(2) == ["cuda", "cuda"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert fold_devices(2) == ["cpu", "cpu"]
