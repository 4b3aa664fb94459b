"""Folder ingestion (ingest.folder) and DICOM header reading (ingest.dicom), on files the tests write."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from breastfusion.errors import BreastFusionError, ManifestError
from breastfusion.ingest.dicom import describe
from breastfusion.ingest.folder import IngestResult, ingest_folder, pseudonymise, read_labels, write_ingest
from breastfusion.records import read_manifest
from breastfusion.vocab import Kind, Label, Modality, Side, View

from dicom_files import DBT_SOP, PHI_MARKERS, US_SOP, write_dicom


def grey(seed: int = 0, shape=(24, 20), dtype=np.uint8, top: int = 255) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) * top).astype(dtype)


def code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def png(path: Path, data: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grey() if data is None else data).save(path)
    return path


# name relative to root -> (side, modality, view, kind) for the files that must become records
EXPECTED = {
    "study/a/IM0001": (Side.LEFT, Modality.MG, View.CC, Kind.STANDARD),
    "study/a/IM0002.dcm": (Side.LEFT, Modality.MG, View.MLO, Kind.STANDARD),
    "study/a/IM0003.dcm": (Side.LEFT, Modality.MG, View.CC, Kind.SYNTHESIZED),
    "study/a/IM0004.dcm": (Side.LEFT, Modality.MG, View.MLO, Kind.SYNTHESIZED),
    "study/b/siemens.dcm": (Side.RIGHT, Modality.MG, View.CC, Kind.SYNTHESIZED),
    "study/b/ge.dcm": (Side.RIGHT, Modality.MG, View.MLO, Kind.SYNTHESIZED),
    "study/b/mono1_12bit.dcm": (Side.RIGHT, Modality.MG, View.CC, Kind.STANDARD),
    "study/b/dx_breast.dcm": (Side.RIGHT, Modality.MG, View.MLO, Kind.STANDARD),
    "study/b/ml_view.dcm": (Side.RIGHT, Modality.MG, View.OTHER, Kind.STANDARD),
    "study/us/colour.dcm": (Side.LEFT, Modality.US, View.NONE, Kind.NONE),
    "pngs/side_cc.png": (Side.LEFT, Modality.MG, View.CC, Kind.SYNTHESIZED),
    "pngs/us_side.png": (Side.RIGHT, Modality.US, View.NONE, Kind.NONE),
    "PAT-0004/R/MG/RCC_01.png": (Side.RIGHT, Modality.MG, View.CC, Kind.STANDARD),
    "PAT-0004/R/MG/mlo-cview.png": (Side.RIGHT, Modality.MG, View.MLO, Kind.SYNTHESIZED),
    "PAT-0004/R/US/scan1.jpg": (Side.RIGHT, Modality.US, View.NONE, Kind.NONE),
}
# name relative to root -> a word of the reason it is skipped for
SKIPPED = {
    "bad/unknown_side.dcm": "unknown laterality",
    "bad/conflict_side.dcm": "conflicting laterality",
    "bad/volume.dcm": "multi-frame object (4 frames)",
    "bad/dbt.dcm": "breast tomosynthesis volume",
    "bad/for_processing.dcm": "FOR PROCESSING",
    "bad/no_pixels.dcm": "DICOM without pixel data",
    "bad/empty.dcm": "zero-byte file",
    "bad/truncated.png": "truncated or corrupt image file",
    "bad/text.png": "not an image or DICOM file",
    "bad/notes.txt": "not an image or DICOM file",
    "study/a/IM0001_copy.dcm": "duplicate SOPInstanceUID",
    "bad/no_convention.png": "without sidecar JSON",
    "PAT-0004/R/MG/XCCL.png": "names no single view",
    "pngs/bad_side.png": "bad sidecar JSON (bad_side.json: unknown side 'middle'",
    "study/ct.dcm": "modality CT",
}


def build_archive(root: Path) -> Path:
    """A folder with every case of EXPECTED and SKIPPED."""
    a, b, bad = root / "study" / "a", root / "study" / "b", root / "bad"
    cc_uid = generate_uid()
    write_dicom(a / "IM0001", grey(1), uid=cc_uid, ImageLaterality="L", ViewPosition="CC", SeriesDescription="L CC")
    write_dicom(a / "IM0002.dcm", grey(2), ImageLaterality="L",
                ViewCodeSequence=[code("399368009", "SCT", "medio-lateral oblique")])
    write_dicom(a / "IM0003.dcm", grey(3), SeriesDescription="L CC C-View")  # Hologic; side and view from text
    write_dicom(a / "IM0004.dcm", grey(4), ImageLaterality="L", ViewPosition="MLO",
                ImageType=["DERIVED", "PRIMARY", "TOMO", "GENERATED_2D"])
    write_dicom(b / "siemens.dcm", grey(5), Laterality="R", ViewPosition="CC", SeriesDescription="R CC Insight 2D")
    write_dicom(b / "ge.dcm", grey(6), ImageLaterality="R", ProtocolName="V-Preview RMLO",
                ViewCodeSequence=[code("R-10226", "SRT", "medio-lateral oblique")])
    write_dicom(b / "mono1_12bit.dcm", grey(7, dtype=np.uint16, top=4095), photometric="MONOCHROME1",
                BitsStored=12, WindowCenter=2048, WindowWidth=4096, ImageLaterality="R", ViewPosition="CC")
    write_dicom(b / "dx_breast.dcm", grey(8), modality="DX", BodyPartExamined="BREAST", ImageLaterality="R",
                ViewPosition="MLO", sop_class="1.2.840.10008.5.1.4.1.1.1.1")
    write_dicom(b / "ml_view.dcm", grey(9), ImageLaterality="R", ViewPosition="ML")
    rgb = np.repeat(grey(10)[..., None], 3, axis=2)
    rgb[3:8, 3:8] = (250, 10, 10)
    write_dicom(root / "study" / "us" / "colour.dcm", rgb, photometric="RGB", sop_class=US_SOP, modality="US",
                patient="PAT-0001", Laterality="L")
    write_dicom(bad / "unknown_side.dcm", grey(11), patient="PAT-0002", ViewPosition="CC")
    write_dicom(bad / "conflict_side.dcm", grey(12), patient="PAT-0002", ImageLaterality="L",
                SeriesDescription="R CC")
    write_dicom(bad / "volume.dcm", np.stack([grey(i) for i in range(4)]), NumberOfFrames=4, ImageLaterality="L")
    write_dicom(bad / "dbt.dcm", grey(13), sop_class=DBT_SOP, ImageLaterality="L", NumberOfFrames=1)
    write_dicom(bad / "for_processing.dcm", grey(14), ImageLaterality="L", ViewPosition="CC",
                PresentationIntentType="FOR PROCESSING")
    write_dicom(bad / "no_pixels.dcm", None, ImageLaterality="L", ViewPosition="CC")
    (bad / "empty.dcm").write_bytes(b"")
    data = png(bad / "full.png", grey(15, shape=(64, 64))).read_bytes()
    (bad / "full.png").unlink()
    (bad / "truncated.png").write_bytes(data[: len(data) // 2])
    (bad / "text.png").write_text("not a picture\n")
    (bad / "notes.txt").write_text("notes\n")
    shutil.copy(a / "IM0001", a / "IM0001_copy.dcm")  # walked after the original
    png(bad / "no_convention.png")
    ct = get_testdata_file("CT_small.dcm", download=False)
    if ct is not None:
        shutil.copy(ct, root / "study" / "ct.dcm")
    pngs = root / "pngs"
    png(pngs / "side_cc.png")
    (pngs / "side_cc.json").write_text(json.dumps(
        {"patient_id": "PAT-0003", "side": "L", "modality": "MG", "view": "CC", "kind": "synthesized",
         "label": "benign"}))
    png(pngs / "us_side.png")
    (pngs / "us_side.png.json").write_text(json.dumps({"patient_id": "PAT-0003", "side": "right", "modality": "us"}))
    png(pngs / "bad_side.png")
    (pngs / "bad_side.json").write_text(json.dumps({"patient_id": "PAT-0003", "side": "middle", "modality": "MG"}))
    layout = root / "PAT-0004" / "R"
    png(layout / "MG" / "RCC_01.png")
    png(layout / "MG" / "mlo-cview.png")
    png(layout / "MG" / "XCCL.png")
    (layout / "US").mkdir(parents=True)
    Image.fromarray(np.repeat(grey(16)[..., None], 3, axis=2)).save(layout / "US" / "scan1.jpg")
    (root / ".hidden").write_text("ignored")
    return root


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return build_archive(tmp_path_factory.mktemp("archive"))


@pytest.fixture(scope="module")
def result(archive) -> IngestResult:
    return ingest_folder(archive)


def by_name(result: IngestResult, root: Path) -> dict[str, object]:
    return {Path(r.path).relative_to(root.resolve()).as_posix(): r for r in result.records}


# -- the folder walk ---------------------------------------------------------------------------


def test_views_kinds_sides_of_kept_images(archive, result):
    records = by_name(result, archive)
    assert set(records) == set(EXPECTED)
    for name, (side, modality, view, kind) in EXPECTED.items():
        rec = records[name]
        assert (rec.side, rec.modality, rec.view, rec.kind) == (side, modality, view, kind), name
        assert Path(rec.path).is_absolute()


def test_patients_and_labels_from_sidecar(archive, result):
    records = by_name(result, archive)
    assert records["study/a/IM0001"].patient_id == "PAT-0001"
    assert records["pngs/side_cc.png"].label is Label.BENIGN
    assert records["PAT-0004/R/US/scan1.jpg"].patient_id == "PAT-0004"


def test_bad_files_are_skipped_with_their_reason(result):
    skipped = dict(result.skipped)
    expected = dict(SKIPPED)
    if "study/ct.dcm" not in skipped:
        expected.pop("study/ct.dcm")  # bundled CT_small.dcm not available
    assert set(skipped) == set(expected)
    for name, reason in expected.items():
        assert reason in skipped[name], (name, skipped[name])
        assert "\n" not in skipped[name] and not skipped[name].startswith("/")


def test_flags_and_summary(result):
    assert ("study/b/ml_view.dcm", "other view (ML)") in result.flagged
    assert ("study/a/IM0003.dcm", "laterality from text") in result.flagged
    text = result.summary() + "\n"
    assert "patients: 3, cases (breasts): 5, images: 15" in text
    assert "CC synthesized: 3" in text and "OTHER: 1" in text
    assert "US: 3" in text
    assert f"skipped: {len(result.skipped)}\n" in text and "\n  zero-byte file: 1\n" in text
    assert "\n  multi-frame object: 1\n" in text and "\n  not an image or DICOM file: 2\n" in text


def test_walk_is_deterministic(archive, result):
    again = ingest_folder(archive)
    assert again.records == result.records and again.skipped == result.skipped


def test_write_ingest_round_trips_through_read_manifest(archive, result, tmp_path):
    manifest, skipped = write_ingest(result, tmp_path / "out" / "manifest.csv")
    assert skipped == tmp_path / "out" / "skipped.csv"
    loaded = read_manifest(manifest, require_labels=False)
    assert sorted(r.path for r in loaded.records) == sorted(r.path for r in result.records)
    with open(skipped, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {row["path"] for row in rows} == {path for path, _ in result.skipped}
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(BreastFusionError, match="not a folder"):
        ingest_folder(tmp_path / "nope")


# -- privacy -----------------------------------------------------------------------------------


def test_no_phi_in_any_output(archive, tmp_path, capsys, caplog, recwarn):
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,side,label\nPAT-0001,L,malignant\nPAT-0001,R,normal\n")
    outputs = []
    for salt in (None, "s3cret"):
        res = ingest_folder(archive, labels_csv=labels, pseudonymise_salt=salt, progress=True)
        out = tmp_path / f"out-{salt}"
        write_ingest(res, out / "manifest.csv")
        outputs += [p.read_text() for p in sorted(out.iterdir())]
        outputs += [res.summary(), repr(res)]
    captured = capsys.readouterr()
    outputs += [captured.out, captured.err, caplog.text, *(str(w.message) for w in recwarn)]
    for text in outputs:
        for marker in PHI_MARKERS:
            assert marker not in text


def test_invalid_values_are_not_quoted_by_pydicom_warnings(tmp_path, capsys, caplog, recwarn):
    """pydicom warns about invalid values, quoting them, when it converts them; reading must silence that."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_dicom(tmp_path / "a.dcm", grey(1), ImageLaterality="L", ViewPosition="CC",
                    StudyInstanceUID="1.2.3.Secretname", PatientBirthDate="1958-04-17 Secretname")
    recwarn.clear(), caplog.clear(), capsys.readouterr()  # only what reading says counts
    res = ingest_folder(tmp_path)
    assert len(res.records) == 1
    captured = capsys.readouterr()
    for text in (captured.out, captured.err, caplog.text, res.summary(), *(str(w.message) for w in recwarn)):
        assert "Secretname" not in text


def test_pseudonymised_ids(archive, tmp_path):
    res = ingest_folder(archive, pseudonymise_salt="pepper")
    expected = "anon-" + hashlib.sha256(b"pepperPAT-0001").hexdigest()[:12]
    assert expected == pseudonymise("PAT-0001", "pepper")
    ids = {r.patient_id for r in res.records}
    assert expected in ids and all(i.startswith("anon-") and len(i) == 17 for i in ids)
    manifest, _ = write_ingest(res, tmp_path / "manifest.csv")
    with open(manifest, newline="") as fh:
        for row in csv.DictReader(fh):
            assert "PAT-" not in row["patient_id"] + row["group"]
    assert "PAT-" not in res.summary()


# -- labels ------------------------------------------------------------------------------------


def test_labels_csv_is_joined_per_breast(archive, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("Patient_ID,Side,Label\nPAT-0001,L,Malignant\nPAT-0001,R,normal\nPAT-0004,,benign\n"
                      "PAT-9999,L,normal\n")
    res = ingest_folder(archive, labels_csv=labels)
    got = {r.case_id: r.label for r in res.records}
    assert got["PAT-0001:L"] is Label.MALIGNANT and got["PAT-0001:R"] is Label.NORMAL
    assert got["PAT-0004:R"] is Label.BENIGN and got["PAT-0003:L"] is Label.BENIGN  # sidecar label kept
    assert res.problems == ["labels.csv line 5: no ingested image for this patient and side"]
    assert "labels.csv line 5" in res.summary() and "PAT-9999" not in res.summary()


def test_labels_match_pseudonymised_ids(archive, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text(f"patient_id,side,label\n{pseudonymise('PAT-0001', 'k')},L,benign\n")
    res = ingest_folder(archive, labels_csv=labels, pseudonymise_salt="k")
    assert {r.label for r in res.records if r.case_id.endswith(":L") and r.label} == {Label.BENIGN}
    assert res.problems == []


def test_bad_labels_csv_lists_every_bad_line(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,side,label\nA,L,cancer\nB,X,normal\n,L,normal\nC,L,normal\nC,L,benign\n")
    with pytest.raises(ManifestError) as err:
        read_labels(labels)
    text = str(err.value)
    assert "line 2: unknown label 'cancer'" in text and "line 3: unknown side 'X'" in text
    assert "line 4: empty patient_id" in text and "line 6: label benign differs from line 5" in text
    (tmp_path / "cols.csv").write_text("patient,label\nA,normal\n")
    with pytest.raises(ManifestError, match="missing column"):
        read_labels(tmp_path / "cols.csv")


# -- bundled pydicom files ---------------------------------------------------------------------


def test_bundled_files_are_skipped_for_clear_reasons(tmp_path):
    names = {"MR_small.dcm": "modality MR", "rtplan.dcm": "DICOM without pixel data",
             "examples_ybr_color.dcm": "multi-frame object", "examples_palette.dcm": "unknown laterality"}
    copied = {}
    for name, reason in names.items():
        path = get_testdata_file(name, download=False)
        if path is not None:
            shutil.copy(path, tmp_path / name)
            copied[name] = reason
    if not copied:
        pytest.skip("no pydicom test files available")
    res = ingest_folder(tmp_path)
    skipped = dict(res.skipped)
    assert res.records == [] and set(skipped) == set(copied)
    for name, reason in copied.items():
        assert reason in skipped[name], skipped[name]


# -- describe() --------------------------------------------------------------------------------


def header(**tags) -> Dataset:
    ds = Dataset()
    ds.PatientID, ds.PixelData = "P", b"\0\0"
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize("tags, side", [
    ({"ImageLaterality": "L"}, Side.LEFT),
    ({"Laterality": "R"}, Side.RIGHT),
    ({"SeriesDescription": "RMLO"}, Side.RIGHT),
    ({"ViewPosition": "LCC"}, Side.LEFT),
    ({"ProtocolName": "Left breast"}, Side.LEFT),
    ({"ImageLaterality": "B"}, None),
    ({"ImageLaterality": "L", "Laterality": "R"}, None),
    ({"SeriesDescription": "Screening"}, None),
])
def test_laterality(tags, side):
    assert describe(header(Modality="MG", ViewPosition=tags.pop("ViewPosition", "CC"), **tags)).side is side


@pytest.mark.parametrize("tags, view", [
    ({"ViewPosition": "CC"}, View.CC),
    ({"ViewPosition": "MLO"}, View.MLO),
    ({"ViewCodeSequence": [code("R-10242", "SRT", "cranio-caudal")]}, View.CC),
    ({"ViewCodeSequence": [code("399162004", "SCT", "cranio-caudal")]}, View.CC),
    ({"ViewCodeSequence": [code("X", "99L", "medio-lateral oblique")]}, View.MLO),
    ({"ViewCodeSequence": [code("R-1024A", "SRT", "exaggerated cranio-caudal")]}, View.OTHER),
    ({"ViewPosition": "XCCL"}, View.OTHER),
    ({"ViewPosition": "CC", "SeriesDescription": "L CC SPOT"}, View.OTHER),
    ({"SeriesDescription": "L MLO"}, View.MLO),
    ({}, View.OTHER),
])
def test_view(tags, view):
    info = describe(header(Modality="MG", ImageLaterality="L", **tags))
    assert info.view is view
    assert bool(info.flags) == (view is View.OTHER)


def test_view_modifier_makes_other():
    item = code("399162004", "SCT", "cranio-caudal")
    item.ViewModifierCodeSequence = [code("R-102D6", "SRT", "magnification")]
    info = describe(header(Modality="MG", ImageLaterality="L", ViewCodeSequence=[item]))
    assert info.view is View.OTHER and info.flags == ["view modifier (magnification)"]


@pytest.mark.parametrize("tags", [
    {"SeriesDescription": "L CC C-View"},
    {"SeriesDescription": "LCC CView"},
    {"SeriesDescription": "L MLO Insight 2D"},
    {"ProtocolName": "V-Preview"},
    {"SeriesDescription": "S-View L CC"},
    {"AcquisitionDeviceProcessingDescription": "Synthesized 2D"},
    {"DerivationDescription": "synthetic mammogram"},
    {"ImageType": ["DERIVED", "PRIMARY", "GENERATED_2D"]},
    {"SeriesDescription": "2D_synth"},
])
def test_synthesized_markers(tags):
    info = describe(header(Modality="MG", ImageLaterality="L", ViewPosition="CC", **tags))
    assert info.kind is Kind.SYNTHESIZED and info.reject_reason is None


def test_standard_2d_and_study_description_is_not_read():
    info = describe(header(Modality="MG", ImageLaterality="L", ViewPosition="CC",
                           StudyDescription="Tomo + C-View", SeriesDescription="L CC"))
    assert info.kind is Kind.STANDARD


@pytest.mark.parametrize("tags, modality", [
    ({"Modality": "MG"}, Modality.MG),
    ({"Modality": "DX", "BodyPartExamined": "BREAST"}, Modality.MG),
    ({"Modality": "CR", "ViewPosition": "MLO"}, Modality.MG),
    ({"Modality": "DX", "ViewPosition": "PA"}, None),
    ({"Modality": "US"}, Modality.US),
    ({"Modality": "CT"}, None),
])
def test_modality(tags, modality):
    assert describe(header(ImageLaterality="R", **tags)).modality is modality


@pytest.mark.parametrize("tags, reason", [
    ({"SOPClassUID": DBT_SOP}, "breast tomosynthesis volume"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.13.1.4"}, "breast projection"),
    ({"NumberOfFrames": 25}, "multi-frame object (25 frames)"),
    ({"PresentationIntentType": "FOR PROCESSING"}, "FOR PROCESSING"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.2.1"}, "FOR PROCESSING"),
    ({"ImageType": ["DERIVED", "PRIMARY", "TOMOSYNTHESIS"]}, "tomosynthesis slice"),
    ({"SeriesDescription": "L CC Tomo"}, "tomosynthesis slice"),
    ({"PatientID": ""}, "no PatientID"),
])
def test_reject_reasons(tags, reason):
    info = describe(header(Modality="MG", ImageLaterality="L", ViewPosition="CC", **tags))
    assert info.reject_reason is not None and reason in info.reject_reason


def test_us_has_no_view_or_kind():
    info = describe(header(Modality="US", Laterality="L"))
    assert (info.modality, info.view, info.kind, info.reject_reason) == (Modality.US, View.NONE, Kind.NONE, None)
