import csv

import pytest

from breastfusion.errors import ManifestError
from breastfusion.records import read_manifest
from breastfusion.vocab import MG_SLOTS, Label, Modality

from conftest import write_tiny_cohort


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _write(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_round_trip_and_cases(tmp_path):
    m = read_manifest(write_tiny_cohort(tmp_path, n_cases=6))
    cases = m.cases()
    assert len(cases) == 6 and len(m) == 6 * 6
    case = cases["P001:L"]
    assert case.label is Label.BENIGN and set(case.mg) == set(MG_SLOTS) and len(case.us) == 2
    assert all(r.modality is Modality.US for r in case.us)
    assert m.class_counts() == {"normal": 2, "benign": 2, "malignant": 2}
    assert len(m.content_hash()) == 16


@pytest.mark.parametrize("edit,message", [
    (lambda r: r[0].update(label="cancer"), "unknown label 'cancer'"),
    (lambda r: r[0].update(side="X"), "unknown side"),
    (lambda r: r[0].update(modality="CT"), "unknown modality"),
    (lambda r: r[0].update(path="img/nope.png"), "file not found"),
    (lambda r: r[1].update(label="malignant"), "case has two labels"),
    (lambda r: r[0].update(view=""), "MG image without a view"),
    (lambda r: r[0].update(patient_id=""), "empty patient_id"),
    (lambda r: r[2].update(path=r[1]["path"]), "already listed"),
])
def test_validation_names_the_problem_in_one_line(tmp_path, edit, message):
    path = write_tiny_cohort(tmp_path, n_cases=3)
    rows = _rows(path)
    edit(rows)
    _write(path, rows)
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    lines = str(info.value).splitlines()
    assert any(message in line for line in lines[1:]), str(info.value)


def test_missing_column_and_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "none.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,path\nP1,a.png\n")
    with pytest.raises(ManifestError, match="missing column"):
        read_manifest(bad)


def test_labels_optional_for_prediction(tmp_path):
    path = write_tiny_cohort(tmp_path, n_cases=3)
    rows = _rows(path)
    for r in rows:
        r["label"] = ""
    _write(path, rows)
    with pytest.raises(ManifestError, match="no label"):
        read_manifest(path)
    assert read_manifest(path, require_labels=False).cases()["P000:L"].label is None


def test_paths_escaping_the_data_root_are_refused(tmp_path):
    from PIL import Image

    from breastfusion.errors import ManifestError
    from breastfusion.records import read_manifest

    data = tmp_path / "data"
    data.mkdir()
    outside = tmp_path / "secret.png"
    Image.new("L", (8, 8)).save(outside)
    Image.new("L", (8, 8)).save(tmp_path / "other.png")
    Image.new("L", (8, 8)).save(data / "ok.png")
    csv = data / "m.csv"
    csv.write_text("patient_id,side,modality,view,kind,path,label,group\n"
                   "P1,L,US,,,ok.png,benign,\nP2,L,US,,,../other.png,benign,\n"
                   f"P3,L,US,,,{outside},benign,\n")
    assert len(read_manifest(csv)) == 3  # without a root, the CSV's own choice
    with pytest.raises(ManifestError) as err:
        read_manifest(csv, data_root=data)
    assert str(err.value).count("outside the data root") == 2 and "ok.png" not in str(err.value)
