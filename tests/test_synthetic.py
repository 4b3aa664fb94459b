import csv
import hashlib

import numpy as np
from PIL import Image

from breastfusion.datasets.synthetic import SynthConfig, generate_cohort
from breastfusion.records import read_manifest
from breastfusion.vocab import MG_SLOTS, Modality


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_cohort_is_seeded_complete_and_valid(tmp_path):
    cfg = SynthConfig(n_patients=12, image_size=64, seed=3)
    records = generate_cohort(tmp_path / "a", cfg)
    generate_cohort(tmp_path / "b", cfg)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # byte-identical
    manifest = read_manifest(tmp_path / "a" / "manifest.csv")
    assert len(manifest) == len(records)
    cases = manifest.cases()
    assert len(cases) == 12
    for case in cases.values():
        assert set(case.mg) == set(MG_SLOTS)
        assert 1 <= len(case.us) <= 4
    assert all(v >= 1 for v in manifest.class_counts().values())
    first = records[0]
    assert Image.open(first.path).size == (64, 64)
    other = generate_cohort(tmp_path / "c", SynthConfig(n_patients=12, image_size=64, seed=4))
    assert not np.array_equal(np.asarray(Image.open(other[0].path)), np.asarray(Image.open(first.path)))


def test_lesions_file_marks_lesion_images_only(tmp_path):
    generate_cohort(tmp_path, SynthConfig(n_patients=30, image_size=64, seed=0))
    manifest = read_manifest(tmp_path / "manifest.csv")
    label_of = {r.path: r.label.value for r in manifest.records}
    with open(tmp_path / "lesions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(manifest)
    for row in rows:
        label = label_of[str((tmp_path / row["path"]).resolve())]
        if row["lesion"] == "1":
            assert label != "normal"
            cx, cy, r = float(row["cx"]), float(row["cy"]), float(row["radius"])
            assert 0 <= cx < 64 and 0 <= cy < 64 and 0 < r < 32
        elif label == "malignant" and row["modality"] == Modality.MG.value:
            raise AssertionError("malignant masses are always visible on MG")
