"""The spine's cross-validation runs unchanged on a manifest from `ingest` and on the virtual cohort."""

import numpy as np

from breastfusion.config import BackboneConfig, CVConfig, RunConfig, TrainConfig
from breastfusion.experiment import run_experiment
from breastfusion.ingest.folder import ingest_folder, write_ingest
from breastfusion.records import read_manifest

from conftest import SHARED_DATASETS, requires_shared_datasets, tiny_model_config
from cv_checks import check_cv_row
from dicom_files import US_SOP, write_dicom


def _rows(tmp_path, folds=5):
    model = tiny_model_config(backbone=BackboneConfig(name="resnet18", weights="none", frozen="all", image_size=32))
    train = TrainConfig(mode="cached", epochs=2, batch_size=8, cache_dir=str(tmp_path / "cache"))
    return [RunConfig(name=n, model=type(model)(**{**model.__dict__, "modalities": mods}), train=train,
                      cv=CVConfig(folds=folds, test_folds=1))
            for n, mods in (("US", ["US"]), ("MG", ["MG"]), ("MM", ["MG", "US"]))]


def test_cv_runs_on_an_ingested_dicom_archive(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "archive"
    labels = ["patient_id,side,label"]
    for i in range(15):
        pid = f"PAT{i:03d}"
        side = "L" if i % 2 else "R"
        for view in ("CC", "MLO"):
            for desc in (f"{side} {view}", f"{side} {view} C-View"):
                write_dicom(root / pid / f"{view}_{len(desc)}.dcm", (rng.random((40, 32)) * 4095).astype(np.uint16),
                            patient=pid, ImageLaterality=side, ViewPosition=view, SeriesDescription=desc,
                            BitsStored=12)
        for k in range(2):
            write_dicom(root / pid / f"us{k}.dcm", (rng.random((30, 40)) * 255).astype(np.uint8), patient=pid,
                        modality="US", sop_class=US_SOP, Laterality=side)
        labels.append(f"{pid},{side},{('normal', 'benign', 'malignant')[i % 3]}")
    (tmp_path / "labels.csv").write_text("\n".join(labels) + "\n")
    result = ingest_folder(root, labels_csv=tmp_path / "labels.csv")
    assert not result.skipped, result.skipped
    manifest_path, _ = write_ingest(result, tmp_path / "manifest.csv")
    manifest = read_manifest(manifest_path)
    cases = manifest.cases()
    assert len(cases) == 15 and all(len(c.mg) == 4 and len(c.us) == 2 for c in cases.values())
    metrics = run_experiment(manifest, _rows(tmp_path), tmp_path / "run", progress=False)
    assert all(sum(map(sum, r["patient"]["confusion"])) == 15 for r in metrics["rows"])
    for row in metrics["rows"]:
        check_cv_row(tmp_path / "run", row, manifest)  # predictions vary; metrics follow from the files


def test_cv_runs_on_the_virtual_cohort(tmp_path):
    requires_shared_datasets()
    from breastfusion.datasets.public import load_public
    from breastfusion.datasets.virtual import build_virtual_cohort

    busi = load_public("busi", SHARED_DATASETS / "BUSI")
    mias = load_public("mias", SHARED_DATASETS / "mini-MIAS")
    cohort = build_virtual_cohort(mias, busi, seed=0)
    path = cohort.write(tmp_path / "virtual.csv")
    manifest = read_manifest(path)
    # a slice of whole groups keeps the test fast while exercising grouping
    groups = sorted({r.group_id for r in manifest.records})[:20]
    manifest.records = [r for r in manifest.records if r.group_id in groups]
    rows = _rows(tmp_path)[2:]
    metrics = run_experiment(manifest, rows, tmp_path / "run", progress=False)
    n_cases = len(manifest.cases())
    assert sum(map(sum, metrics["rows"][0]["patient"]["confusion"])) == n_cases
    check_cv_row(tmp_path / "run", metrics["rows"][0], manifest)
