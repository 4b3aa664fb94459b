"""Subgroup columns of manifests (records.SUBGROUP_COLUMNS) from DICOM headers, sidecars and labels
CSVs; the cohort table (evaluation.cohort) and `breastfusion cohort`; never an exact age or any PHI."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pydicom import dcmread

from breastfusion.cli import main
from breastfusion.errors import ManifestError
from breastfusion.evaluation.cohort import cohort_markdown, cohort_table
from breastfusion.ingest.dicom import describe, parse_patient_age
from breastfusion.ingest.folder import ingest_folder, read_labels, write_ingest
from breastfusion.records import (
    COLUMNS,
    SUBGROUP_COLUMNS,
    ImageRecord,
    Manifest,
    age_bin,
    case_attributes,
    read_manifest,
    write_manifest,
)
from breastfusion.vocab import Kind, Label, Modality, Side, View

from dicom_files import PHI_MARKERS, US_SOP, write_dicom

EXACT = ["054", "19580417", "20080416", "20480101", "Secretname"]  # ages, dates and names of the files below


def grey(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((16, 12)) * 255).astype(np.uint8)


@pytest.fixture()
def dicom_archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    write_dicom(root / "a.dcm", grey(1), ImageLaterality="L", ViewPosition="CC", PatientAge="054Y",
                Manufacturer="HOLOGIC, Inc.", ManufacturerModelName="Selenia <Dimensions>")
    # no PatientAge: birth date 1958-04-17 (dicom_files.PHI) to the study date, one day short of 50 years
    write_dicom(root / "b.dcm", grey(2), patient="PAT-0005", ImageLaterality="L", ViewPosition="MLO",
                StudyDate="20080416",
                Manufacturer="HOLOGIC, Inc.")
    # no StudyDate: AcquisitionDate; 89 years old -> 80-89
    write_dicom(root / "c.dcm", grey(3), patient="PAT-0002", ImageLaterality="R", ViewPosition="CC",
                AcquisitionDate="20480101", ManufacturerModelName="Senographe/Pristina (v2)")
    write_dicom(root / "d.dcm", grey(4), patient="PAT-0003", sop_class=US_SOP, modality="US",
                ImageLaterality="R", PatientAge="030M", Manufacturer="GE Healthcare")
    write_dicom(root / "e.dcm", grey(5), patient="PAT-0004", ImageLaterality="L", ViewPosition="CC")  # no date
    return root


def test_dicom_age_bins_and_device_names_reach_the_manifest_and_nothing_exact(dicom_archive, tmp_path):
    result = ingest_folder(dicom_archive)
    assert result.skipped == []
    got = {Path(r.path).name: (r.age_bin, r.manufacturer, r.model_name) for r in result.records}
    assert got == {
        "a.dcm": ("50-59", "HOLOGIC Inc.", "Selenia Dimensions"),
        "b.dcm": ("40-49", "HOLOGIC Inc.", ""),
        "c.dcm": ("80-89", "", "SenographePristina v2"),
        "d.dcm": ("0-9", "GE Healthcare", ""),
        "e.dcm": ("", "", ""),
    }
    info = describe(dcmread(dicom_archive / "a.dcm"))
    assert not any(marker in repr(info) for marker in EXACT)
    manifest, skipped = write_ingest(result, tmp_path / "out" / "manifest.csv")
    with open(manifest, newline="") as fh:
        header = next(csv.reader(fh))
    assert header == [*COLUMNS, "age_bin", "manufacturer", "model_name"]
    text = manifest.read_text() + skipped.read_text() + result.summary()
    assert not [m for m in [*EXACT, *PHI_MARKERS] if m in text]
    out = CliRunner().invoke(main, ["cohort", str(manifest)])
    assert out.exit_code == 0, out.output
    assert "| 50-59 |" in out.output and "| HOLOGIC Inc. |" in out.output and "| unknown |" in out.output
    assert not [m for m in [*EXACT, *PHI_MARKERS, "PAT-000"] if m in out.output]


@pytest.mark.parametrize(("text", "years"), [("054Y", 54), ("030M", 2.5), ("012W", 12 * 7 / 365.25),
                                             ("005D", 5 / 365.25), ("54", 54), (" 090y", 90), ("", None),
                                             ("54 years", None), ("999Y", None), ("-05Y", None)])
def test_parse_patient_age(text, years):
    assert parse_patient_age(text) == (pytest.approx(years) if years is not None else None)


def test_age_bin():
    assert [age_bin(x) for x in (None, -1, float("nan"), 0, 9.99, 10, 49, 54.9, 89.9, 90, 104)] == [
        "", "", "", "0-9", "0-9", "10-19", "40-49", "50-59", "80-89", "90+", "90+"]


def _rec(pid: str, side: str = "L", label: Label | None = Label.NORMAL, modality: Modality = Modality.MG,
         view: View = View.CC, kind: Kind = Kind.STANDARD, **attrs) -> ImageRecord:
    if modality is Modality.US:
        view, kind = View.NONE, Kind.NONE
    name = f"{pid}_{side}_{modality.value}_{view.value}_{kind.value}_{len(attrs)}.png"
    return ImageRecord(pid, Side(side), modality, f"/data/{name}", view, kind, label, **attrs)


def test_manifest_without_subgroup_values_writes_and_hashes_as_before(tmp_path):
    records = [ImageRecord("P1", Side.LEFT, Modality.MG, str(tmp_path / "a.png"), View.CC, Kind.STANDARD,
                           Label.NORMAL),
               ImageRecord("P1", Side.RIGHT, Modality.US, str(tmp_path / "b.png"), label=Label.BENIGN, group="G1")]
    path = write_manifest(records, tmp_path / "m.csv")
    assert path.read_bytes() == (b"patient_id,side,modality,view,kind,path,label,group\r\n"
                                 b"P1,L,MG,CC,2D,a.png,normal,\r\nP1,R,US,,,b.png,benign,G1\r\n")
    before = hashlib.sha256()  # the hash as it was before the subgroup columns existed
    for line in (f"P1|L|MG|CC|2D|{(tmp_path / 'a.png').as_posix()}|normal|",
                 f"P1|R|US|||{(tmp_path / 'b.png').as_posix()}|benign|G1"):
        before.update(line.encode() + b"\n")
    assert Manifest(records).content_hash() == before.hexdigest()[:16]


def test_subgroup_columns_round_trip_cleaned(tmp_path):
    records = [_rec("P1", source="clinic A", age_bin="50-59", density="C"),
               _rec("P1", view=View.MLO, manufacturer="GE <Healthcare>;", age_bin="67"),
               _rec("P2", label=Label.MALIGNANT)]
    assert records[1].manufacturer == "GE Healthcare" and records[1].age_bin == "60-69"  # an age becomes a bin
    assert _rec("P3", model_name="  M  " * 40).model_name == " ".join(["M"] * 40)[:64].strip()
    path = write_manifest(records, tmp_path / "m.csv")
    with open(path, newline="") as fh:
        header = next(csv.reader(fh))
    assert header == [*COLUMNS, "source", "age_bin", "manufacturer", "density"]  # model_name: nobody fills it
    back = read_manifest(path, check_files=False)
    assert [(r.source, r.age_bin, r.manufacturer, r.model_name, r.density) for r in back.records] == [
        ("clinic A", "50-59", "", "", "C"), ("", "60-69", "GE Healthcare", "", ""), ("", "", "", "", "")]
    assert back.content_hash() == read_manifest(path, check_files=False).content_hash()
    plain = [ImageRecord(r.patient_id, r.side, r.modality, r.path, r.view, r.kind, r.label) for r in back.records]
    assert Manifest(plain).content_hash() != back.content_hash()
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,side,modality,path,label,age_bin\nP1,L,US,x.png,normal,fifty-four\n")
    with pytest.raises(ManifestError, match="age_bin is not a 10-year bin") as err:
        read_manifest(bad, check_files=False)
    assert "fifty" not in str(err.value)


def test_case_attributes_join_the_values_of_a_breast():
    records = [_rec("V1", source="CDD-CESM", age_bin="40-49", model_name="machine 1"),
               _rec("V1", view=View.MLO, source="CDD-CESM", age_bin="40-49", model_name="machine 2"),
               _rec("V1", modality=Modality.US, source="BUSI")]
    (case,) = Manifest(records).cases().values()
    assert case_attributes(case, "source") == case_attributes(records, "source") == "BUSI+CDD-CESM"
    assert case_attributes(case, "age_bin") == "40-49" and case_attributes(case, "density") == ""
    assert case_attributes(records, "model_name") == "machine 1+machine 2"
    with pytest.raises(ValueError, match="subgroup column"):
        case_attributes(records, "age")


def _png(path: Path, meta: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grey(0)).save(path)
    if meta is not None:
        path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def test_labels_csv_density_and_age_and_sidecar_attributes(tmp_path):
    root = tmp_path / "images"
    _png(root / "PAT-1" / "L" / "MG" / "CC.png")
    _png(root / "PAT-1" / "R" / "MG" / "CC.png")
    _png(root / "PAT-2" / "L" / "US" / "scan.png")
    _png(root / "side" / "x.png", {"patient_id": "PAT-3", "side": "R", "modality": "US", "age": 67,
                                   "manufacturer": "Acme <Sonic>", "source": "clinic-B", "density": "B"})
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_id,side,label,Density,Age\nPAT-1,L,benign,c,\nPAT-1,R,normal,4,\n"
                      "PAT-1,,normal,,54\nPAT-2,,malignant,,91.5\n")
    res = ingest_folder(root, labels_csv=labels)
    assert res.problems == []
    got = {r.case_id: (r.label, r.density, r.age_bin, r.source, r.manufacturer) for r in res.records}
    assert got == {"PAT-1:L": (Label.BENIGN, "C", "50-59", "", ""), "PAT-1:R": (Label.NORMAL, "D", "50-59", "", ""),
                   "PAT-2:L": (Label.MALIGNANT, "", "90+", "", ""), "PAT-3:R": (None, "B", "60-69", "clinic-B",
                                                                                "Acme Sonic")}
    manifest, _ = write_ingest(res, tmp_path / "out" / "manifest.csv")
    assert ",54" not in manifest.read_text() and "91.5" not in manifest.read_text()
    labels.write_text("patient_id,side,label,density,age\nA,L,normal,E,\nB,L,normal,,old\nC,L,normal,A,\n"
                      "C,L,normal,B,\nD,,normal,,-3\n")
    with pytest.raises(ManifestError) as err:
        read_labels(labels)
    text = str(err.value)
    assert "line 2: density 'E' is not a BI-RADS density" in text and "line 3: age is not a number" in text
    assert "line 5: density B differs from line 4" in text and "line 6: age is not a number" in text
    _png(root / "side" / "y.png", {"patient_id": "PAT-4", "side": "L", "modality": "US", "age": "x7"})
    res = ingest_folder(root)
    assert [reason for path, reason in res.skipped if path.endswith("y.png")] == [
        "bad sidecar JSON (y.json: age is not a number of years)"]


def _cohort_records() -> list[ImageRecord]:
    records = []
    for i in range(6):  # 6 normal patients, 7 breasts, each MG CC + MLO and one US
        for side in ("L", "R") if i == 0 else ("L",):
            records += [_rec(f"N{i}", side, source="A", age_bin="50-59"),
                        _rec(f"N{i}", side, view=View.MLO, source="A", age_bin="50-59"),
                        _rec(f"N{i}", side, modality=Modality.US, source="B")]
    for i in range(2):  # 2 malignant breasts of women aged 90+, MG only, one synthesized CC
        records += [_rec(f"M{i}", label=Label.MALIGNANT, age_bin="90+"),
                    _rec(f"M{i}", label=Label.MALIGNANT, kind=Kind.SYNTHESIZED, age_bin="90+")]
    return records


def test_cohort_table_counts_and_suppresses_small_cells():
    table = cohort_table(Manifest(_cohort_records()))
    assert table["columns"] == ["normal", "benign", "malignant", "total"]
    rows = {(s["title"], r["row"]): r for s in table["sections"] for r in s["rows"]}
    assert rows[("cohort", "patients")] == {"row": "patients", "normal": 6, "benign": 0, "malignant": "<5",
                                            "total": 8}
    assert rows[("cohort", "breasts (cases)")]["total"] == 9
    assert rows[("cohort", "MG images")] == {"row": "MG images", "normal": 14, "benign": 0, "malignant": "<5",
                                             "total": 18}
    slots = "MG views and image kinds (breasts with the image)"
    assert rows[(slots, "CC 2D")]["total"] == 9 and rows[(slots, "MLO 2D")]["malignant"] == 0
    assert rows[(slots, "CC synthesized")]["malignant"] == "<5"
    us = "US images per breast"
    assert rows[(us, "mean")]["normal"] == "1.0" and rows[(us, "range")]["total"] == "0-1"
    assert rows[(us, "mean")]["benign"] == "-"
    source = "dataset source (breasts)"
    assert rows[(source, "A+B")]["normal"] == 7 and rows[(source, "unknown")]["malignant"] == "<5"
    ages = [r["row"] for s in table["sections"] if s.get("column") == "age_bin" for r in s["rows"]]
    assert ages == ["50-59", "90+"]
    assert not any(s.get("column") in ("manufacturer", "model_name", "density") for s in table["sections"])
    json.dumps(table)
    text = cohort_markdown(table)
    assert "| 90+ | 0 | 0 | <5 | <5 |" in text and "| patients | 6 | 0 | <5 | 8 |" in text
    assert "N0" not in text and "M1" not in text


def test_cohort_command_writes_markdown_and_json_and_fails_cleanly(tmp_path):
    manifest = write_manifest(_cohort_records(), tmp_path / "m.csv")  # images absent: not needed for counts
    out = CliRunner().invoke(main, ["cohort", str(manifest), "-o", str(tmp_path / "t.md"),
                                    "--json", str(tmp_path / "t.json")])
    assert out.exit_code == 0, out.output
    assert out.output == (tmp_path / "t.md").read_text()
    assert "| **age at study, 10-year bins (breasts)** |" in out.output
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved == cohort_table(read_manifest(manifest, check_files=False))
    assert "<5" in json.dumps(saved) and "N0" not in json.dumps(saved)
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,side,modality,path,label\nP1,L,US,x.png,cancer\n")
    out = CliRunner().invoke(main, ["cohort", str(bad)])
    assert out.exit_code == 3 and "unknown label 'cancer'" in out.output and "Traceback" not in out.output


def test_subgroup_columns_constant():
    assert SUBGROUP_COLUMNS == ("source", "age_bin", "manufacturer", "model_name", "density")
