"""Public dataset adapters (BUSI, CDD-CESM, mini-MIAS) and the virtual cohort.

Part (a): tiny fake layouts generated in tmp_path; always run.
Part (b): the real development copies in ../shared/datasets (SHARED_DATASETS);
skipped when absent, a failure under CI=true (conftest.requires_shared_datasets).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from breastfusion.datasets.busi import (
    average_hash,
    busi_masks,
    hash_groups,
    load_busi,
    near_duplicate_groups,
)
from breastfusion.datasets.cdd_cesm import load_cdd_cesm
from breastfusion.datasets.mias import load_mias, mias_lesions, parse_info
from breastfusion.datasets.public import ADAPTERS, load_public
from breastfusion.datasets.virtual import VirtualCohort, build_virtual_cohort, split_counts
from breastfusion.errors import BreastFusionError
from breastfusion.records import ImageRecord, Manifest, case_attributes, case_id, read_manifest, validate
from breastfusion.training.splits import assign_folds
from breastfusion.vocab import Kind, Label, Modality, Side, View

from conftest import SHARED_DATASETS, requires_shared_datasets

# ---------------------------------------------------------------- fake layouts


def _blocks(seed: int, size: int = 64, cells: int = 16) -> np.ndarray:
    """Random grey blocks (cells x cells, upscaled): a distinct image per seed."""
    small = np.random.default_rng(seed).integers(0, 256, (cells, cells)).astype(np.uint8)
    return np.kron(small, np.ones((size // cells, size // cells), dtype=np.uint8))


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _near_copy(arr: np.ndarray, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(-3, 4, arr.shape)
    return np.clip(arr.astype(int) + noise, 0, 255).astype(np.uint8)


@pytest.fixture()
def fake_busi(tmp_path: Path) -> Path:
    root = tmp_path / "BUSI"
    inner = root / "Dataset_BUSI_with_GT"
    base = _blocks(1)
    _save(inner / "benign" / "benign (1).png", base)
    _save(inner / "benign" / "benign (1)_mask.png", np.zeros((64, 64), np.uint8))
    _save(inner / "benign" / "benign (2).png", _near_copy(base, 7))  # near-duplicate of (1)
    _save(inner / "benign" / "benign (2)_mask.png", np.zeros((64, 64), np.uint8))
    _save(inner / "benign" / "benign (3).png", _blocks(3))
    _save(inner / "malignant" / "malignant (1).png", np.stack([_blocks(4)] * 3, axis=-1))  # RGB
    _save(inner / "malignant" / "malignant (1)_mask_1.png", np.zeros((64, 64), np.uint8))
    _save(inner / "malignant" / "malignant (1)_mask.png", np.zeros((64, 64), np.uint8))
    _save(inner / "normal" / "normal (1).png", _blocks(5))
    _save(inner / "normal" / "normal (10).png", _blocks(6))
    return root


def test_busi_records_labels_and_conventions(fake_busi: Path):
    report: dict = {}
    records = load_busi(fake_busi, report=report)
    assert [Path(r.path).name for r in records] == [
        "normal (1).png", "normal (10).png", "benign (1).png", "benign (2).png", "benign (3).png",
        "malignant (1).png",
    ]
    assert Counter(r.label for r in records) == {Label.NORMAL: 2, Label.BENIGN: 3, Label.MALIGNANT: 1}
    assert all(r.modality is Modality.US and r.view is View.NONE and r.kind is Kind.NONE for r in records)
    assert all(r.side is Side.LEFT for r in records)  # no laterality in BUSI: convention
    assert records[2].patient_id == "BUSI-benign-1"
    assert len({r.patient_id for r in records}) == len(records)  # one patient per image
    assert validate(records) == []
    assert report["classes"] == {"normal": 2, "benign": 3, "malignant": 1}
    assert report["near_duplicate_groups"] == 5 and report["largest_group"] == 2


def test_busi_near_duplicates_share_a_group(fake_busi: Path):
    by_name = {Path(r.path).name: r for r in load_busi(fake_busi)}
    assert by_name["benign (1).png"].group == by_name["benign (2).png"].group
    others = {by_name[n].group for n in by_name if n not in ("benign (1).png", "benign (2).png")}
    assert len(others) == 4 and by_name["benign (1).png"].group not in others


def test_busi_accepts_inner_folder_and_finds_masks(fake_busi: Path):
    inner = fake_busi / "Dataset_BUSI_with_GT"
    assert len(load_busi(inner)) == 6
    masks = busi_masks(inner / "malignant" / "malignant (1).png")
    assert [m.name for m in masks] == ["malignant (1)_mask.png", "malignant (1)_mask_1.png"]
    assert busi_masks(inner / "benign" / "benign (3).png") == []
    with pytest.raises(BreastFusionError, match="not a BUSI folder"):
        load_busi(fake_busi / "benign")


def test_busi_skips_unreadable_images(fake_busi: Path, caplog):
    (fake_busi / "Dataset_BUSI_with_GT" / "benign" / "benign (9).png").write_bytes(b"")
    report: dict = {}
    with caplog.at_level(logging.WARNING):
        records = load_busi(fake_busi, report=report)
    assert len(records) == 6
    assert len(report["skipped"]) == 1 and "benign (9).png" in report["skipped"][0]
    assert "benign (9).png" in caplog.text


def test_hash_groups_is_transitive_and_numbered_by_first_appearance():
    rng = np.random.default_rng(0)
    a = rng.random(256) > 0.5
    b = a.copy()
    b[:10] ^= True  # 10 bits from a
    c = b.copy()
    c[100:110] ^= True  # 10 bits from b, 20 from a
    far = ~a
    assert hash_groups(np.stack([far, a, c, b]), max_distance=12) == [0, 1, 1, 1]
    assert hash_groups(np.stack([a, c]), max_distance=12) == [0, 1]
    assert hash_groups(np.zeros((0, 256), bool)) == []


def test_average_hash_handles_modes_and_groups_paths(tmp_path: Path):
    grey = _blocks(11)
    p8 = _save(tmp_path / "g8.png", grey)
    p16 = tmp_path / "g16.png"
    Image.fromarray(grey.astype(np.uint16) * 257).save(p16)
    prgb = _save(tmp_path / "rgb.png", np.stack([grey] * 3, axis=-1))
    h8, h16, hrgb = (average_hash(p) for p in (p8, p16, prgb))
    assert h8.shape == (256,) and h8.dtype == bool
    assert (h8 != h16).sum() <= 2 and (h8 != hrgb).sum() <= 2
    other = _save(tmp_path / "other.png", _blocks(12))
    assert near_duplicate_groups([p8, other, p16, prgb]) == [0, 1, 0, 0]


# CDD-CESM


def _write_cdd(root: Path, sheets: dict[str, pd.DataFrame]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with pd.ExcelWriter(root / "Radiology-manual-annotations.xlsx", engine="openpyxl") as writer:
        for name, frame in sheets.items():
            frame.to_excel(writer, sheet_name=name, index=False)


def _cdd_rows() -> pd.DataFrame:
    rows = [
        # name, patient, side, type, view, label
        ("P1_L_DM_CC", 1, "L", "DM", "CC", "Malignant"),  # DM row differs: must be ignored
        ("P1_L_CM_CC", 1, "L", "CESM", "CC", "Benign"),
        ("P1_L_CM_MLO", 1, "L", "CESM", "MLO", "Benign"),
        ("P1_R_CM_CC", 1, "R", "CESM", "CC", "Normal"),
        ("P1_R_CM_CC", 1, "R", "CESM", "CC", "Benign"),  # listed twice: most severe
        ("P2_L_CM_CC", 2, "L", "CESM", "CC", "Benign"),
        ("P2_L_CM_MLO", 2, "L", "CESM", "MLO", "Normal"),  # breast conflict
        ("", 2, "R", "CESM", "MLO", "Malignant"),  # no name: matched by patient/side/view
        ("P4_L_DM_CC", 4, "L", "DM", "CC", "Normal"),
    ]
    return pd.DataFrame(rows, columns=[" Image_name", "Patient_ID", "Side ", "Type", "View",
                                       "Pathology Classification/ Follow up "])


@pytest.fixture()
def fake_cdd(tmp_path: Path) -> Path:
    root = tmp_path / "CDD-CESM"
    images = root / "Subtracted images of CDD-CESM"
    for i, name in enumerate(["P1_L_CM_CC.jpg", "P1_L_CM_MLO.png", "P1_R_CM_CC.png", "P2_L_CM_CC.png",
                              "P2_L_CM_MLO.png", "P2_R_CM_MLO.png", "P3_R_CM_MLO.png", "P4_L_DM_CC.png"]):
        path = images / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_blocks(20 + i)).save(path)
    (images / "notes.txt").write_text("not an image")
    other = pd.DataFrame({"something": [1]})
    _write_cdd(root, {"mass": other, "all": _cdd_rows()})
    return root


def test_cdd_cesm_labels_from_the_image_row(fake_cdd: Path):
    report: dict = {}
    records = load_cdd_cesm(fake_cdd, report=report)
    got = {Path(r.path).stem: r for r in records}
    assert set(got) == {"P1_L_CM_CC", "P1_L_CM_MLO", "P1_R_CM_CC", "P2_L_CM_CC", "P2_L_CM_MLO", "P2_R_CM_MLO"}
    assert got["P1_L_CM_CC"].label is Label.BENIGN  # not the DM row's 'Malignant'
    assert got["P1_R_CM_CC"].label is Label.BENIGN  # two rows: most severe
    assert got["P2_L_CM_CC"].label is got["P2_L_CM_MLO"].label is Label.BENIGN  # views disagree: most severe
    assert got["P2_R_CM_MLO"].label is Label.MALIGNANT  # matched by patient + side + view
    assert report["breast_label_conflicts"] == ["CDD-P2:L (benign, normal)"]
    assert report["unlabeled"] == ["P3_R_CM_MLO.png"]
    assert len(report["skipped"]) == 1 and "P4_L_DM_CC" in report["skipped"][0]
    assert report["breasts"] == 4 and report["patients"] == 2
    rec = got["P2_L_CM_MLO"]
    assert (rec.patient_id, rec.side, rec.view, rec.kind, rec.modality, rec.group) == (
        "CDD-P2", Side.LEFT, View.MLO, Kind.STANDARD, Modality.MG, "CDD-P2")
    assert validate(records) == []


def test_cdd_cesm_without_all_tab_uses_first_usable_tab(tmp_path: Path):
    root = tmp_path / "cdd"
    images = root / "Subtracted images of CDD-CESM"
    images.mkdir(parents=True)
    Image.fromarray(_blocks(1)).save(images / "P7_R_CM_CC.png")
    frame = pd.DataFrame({"Image_name ": ["P7_R_CM_CC"], "Pathology Classification/Follow up": ["Malignant"]})
    _write_cdd(root, {"notes": pd.DataFrame({"x": [1]}), "calcifications": frame})
    (rec,) = load_cdd_cesm(root)
    assert rec.label is Label.MALIGNANT and rec.side is Side.RIGHT and rec.view is View.CC


def test_cdd_cesm_subgroup_attributes_from_the_sheet(tmp_path: Path):
    root = tmp_path / "cdd"
    images = root / "Subtracted images of CDD-CESM"
    images.mkdir(parents=True)
    for i, name in enumerate(["P1_L_CM_CC", "P1_L_CM_MLO", "P2_R_CM_CC"]):
        Image.fromarray(_blocks(30 + i)).save(images / f"{name}.png")
    rows = [  # density on the DM row only, as in the real sheet; '_' = unknown
        ("P1_L_DM_CC", "DM", 46, "C", 1, "Benign"), ("P1_L_CM_CC", "CESM", 46, "_", 1, "Benign"),
        ("P1_L_CM_MLO", "CESM", 46, "_", 1, "Benign"), ("P2_R_CM_CC", "CESM", 93, "", 2, "Normal"),
    ]
    frame = pd.DataFrame(rows, columns=["Image_name", "Type", "Age", "Breast density (ACR)", "Machine",
                                        "Pathology Classification/ Follow up"])
    _write_cdd(root, {"all": frame})
    got = {Path(r.path).stem: (r.source, r.age_bin, r.density, r.model_name) for r in load_cdd_cesm(root)}
    assert got == {"P1_L_CM_CC": ("CDD-CESM", "40-49", "C", "machine 1"),
                   "P1_L_CM_MLO": ("CDD-CESM", "40-49", "C", "machine 1"),
                   "P2_R_CM_CC": ("CDD-CESM", "90+", "", "machine 2")}


def test_cdd_cesm_missing_sheet_is_one_clear_error(tmp_path: Path):
    images = tmp_path / "cdd" / "Subtracted images of CDD-CESM"
    images.mkdir(parents=True)
    Image.fromarray(_blocks(1)).save(images / "P7_R_CM_CC.png")
    with pytest.raises(BreastFusionError, match="annotation sheet"):
        load_cdd_cesm(tmp_path / "cdd")


# mini-MIAS

INFO = """\
              MAMMOGRAPHIC IMAGE ANALYSIS SOCIETY
This file lists the films in the MIAS database. 1st column: reference number.
4th column: Severity of abnormality; B - Benign  M - Malignant
=================================================================

mdb001 G CIRC B 535 425 197
mdb002 G NORM
mdb003 D CALC B 400 300 20
mdb003 D CALC M *NOTE 3*
mdb004 D NORM{trailing_space}
mdb005 F CIRC B
mdb007 F NORM
mdb008 F CALC
=================================================================
""".format(trailing_space=" ")  # the real Info.txt has trailing spaces on some rows


@pytest.fixture()
def fake_mias(tmp_path: Path) -> Path:
    root = tmp_path / "mini-MIAS"
    images = root / "all-mias"
    images.mkdir(parents=True)
    for n, suffix in [(1, ".png"), (2, ".pgm"), (3, ".png"), (4, ".png"), (5, ".png"), (5, ".pgm"),
                      (6, ".png"), (8, ".png")]:
        Image.fromarray(_blocks(n)).save(images / f"mdb{n:03d}{suffix}")
    (images / "Info.txt").write_text(INFO)
    return root


def test_mias_labels_sides_and_women(fake_mias: Path):
    report: dict = {}
    records = load_mias(fake_mias, report=report)
    got = {Path(r.path).stem: r for r in records}
    assert set(got) == {"mdb001", "mdb002", "mdb003", "mdb004", "mdb005"}
    assert [got[k].label for k in sorted(got)] == [
        Label.BENIGN, Label.NORMAL, Label.MALIGNANT, Label.NORMAL, Label.BENIGN]
    assert got["mdb001"].side is Side.RIGHT and got["mdb002"].side is Side.LEFT
    assert got["mdb001"].patient_id == got["mdb002"].patient_id == got["mdb001"].group == "MIAS-W001"
    assert got["mdb003"].patient_id == got["mdb004"].patient_id == "MIAS-W002"
    assert got["mdb005"].path.endswith(".pgm")  # official extension preferred when both exist
    assert all(r.view is View.MLO and r.kind is Kind.STANDARD and r.modality is Modality.MG for r in records)
    assert report["not_listed"] == ["mdb006.png"] and report["unlabeled"] == ["mdb008.png"]
    assert report["images_with_benign_and_malignant"] == ["mdb003"]
    assert validate(records) == []


def test_mias_tissue_is_density_words_and_busi_has_a_source(fake_mias: Path, fake_busi: Path):
    got = {Path(r.path).stem: (r.source, r.density, r.age_bin) for r in load_mias(fake_mias)}
    assert got["mdb001"] == ("mini-MIAS", "fatty-glandular", "")  # G: MIAS tissue classes, not BI-RADS
    assert got["mdb004"][1] == "dense-glandular" and got["mdb005"][1] == "fatty"
    assert {r.source for r in load_busi(fake_busi)} == {"BUSI"}


def test_mias_lesions_in_row_coordinates(fake_mias: Path):
    lesions = {Path(k).stem: v for k, v in mias_lesions(fake_mias).items()}
    assert lesions["mdb001"] == [(535, 1024 - 425, 197)]
    assert lesions["mdb003"] == [(400, 1024 - 300, 20)]  # the *NOTE 3* row has no coordinates
    assert lesions["mdb002"] == [] and lesions["mdb005"] == []
    paths = {r.path for r in load_mias(fake_mias)}
    assert {k for k, v in mias_lesions(fake_mias).items() if Path(k).stem != "mdb008"} >= paths


def test_parse_info_reports_odd_rows():
    entries, problems = parse_info("mdb010 F\nmdb011 F SPIC X 1 2 3\n")
    assert entries[10].label is None and entries[11].label is None and len(problems) == 2


# registry


def test_registry(fake_mias: Path):
    assert set(ADAPTERS) == {"busi", "cdd-cesm", "mias"}
    assert len(load_public("mini-MIAS", fake_mias.parent)) == 5  # datasets dir holding mini-MIAS/
    assert len(load_public("mias", fake_mias)) == 5
    with pytest.raises(BreastFusionError, match="unknown public dataset"):
        load_public("ddsm", fake_mias)


# virtual cohort


def _mg(woman: int, side: str, label: Label, views=(View.CC, View.MLO)) -> list[ImageRecord]:
    pid = f"W{woman}"
    return [ImageRecord(pid, Side.parse(side), Modality.MG, f"/mg/{pid}_{side}_{v.value}.png", v, Kind.STANDARD,
                        label, group=pid) for v in views]


def _us(name: str, label: Label, group: str) -> ImageRecord:
    return ImageRecord(f"BUSI-{name}", Side.LEFT, Modality.US, f"/us/{name}.png", label=label, group=group)


def _toy_cohort():
    mg = (_mg(1, "L", Label.BENIGN) + _mg(1, "R", Label.NORMAL) + _mg(2, "L", Label.BENIGN)
          + _mg(3, "R", Label.MALIGNANT) + _mg(4, "L", Label.NORMAL) + _mg(5, "R", Label.NORMAL)
          + _mg(6, "L", Label.MALIGNANT))
    us = ([_us(f"b{i}", Label.BENIGN, f"g{i // 2}") for i in range(5)]  # b0,b1 in g0; b2,b3 in g1; b4 in g2
          + [_us("n0", Label.NORMAL, "gn0"), _us("n1", Label.NORMAL, "gn1")]
          + [_us("m0", Label.MALIGNANT, "gm0"), _us("m1", Label.MALIGNANT, "gm0")])  # one group, 2 breasts
    return mg, us


def test_split_counts():
    assert split_counts(7, 3) == [3, 2, 2]
    assert split_counts(2, 4) == [1, 1, 0, 0]
    assert split_counts(0, 2) == [0, 0] and split_counts(3, 0) == []


def test_virtual_cohort_pairs_by_class_and_uses_each_us_once():
    mg, us = _toy_cohort()
    cohort = build_virtual_cohort(mg, us, seed=0)
    assert validate(cohort.records, check_files=False) == []
    us_out = [r for r in cohort.records if r.modality is Modality.US]
    assert len({r.path for r in us_out}) == len(us_out) == len(us)  # every US image used exactly once here
    original = {r.path: r for r in us}
    cases = Manifest(cohort.records).cases()
    for case in cases.values():
        assert all(r.label is case.label is original[r.path].label for r in case.us)
    per_class = defaultdict(list)
    for case in cases.values():
        per_class[case.label].append(len(case.us))
    assert sorted(per_class[Label.BENIGN]) == [2, 3]  # 5 images over 2 breasts: as even as possible
    rep = cohort.report["classes"]
    assert rep["normal"] == {"mg_breasts": 3, "us_images": 2, "kept": 2, "kept_mg_only": 0, "dropped_no_us": 1,
                             "us_used": 2, "us_unused": 0, "us_per_breast_min": 1, "us_per_breast_max": 1}
    assert cohort.report["breasts_dropped"] == 1 and cohort.report["breasts_kept"] == 6


def test_virtual_cohort_groups_join_shared_sources():
    mg, us = _toy_cohort()
    cohort = build_virtual_cohort(mg, us, seed=3)
    cases = Manifest(cohort.records).cases()
    # the malignant near-duplicate group gm0 is split over the two malignant breasts: one group
    assert cases["W3:R"].group == cases["W6:L"].group
    # every source group (MG woman, BUSI near-duplicate group) lands in one virtual group
    source_groups = defaultdict(set)
    us_group = {r.path: r.group for r in us}
    for case in cases.values():
        source_groups["mg:" + case.patient_id].add(case.group)
        for r in case.us:
            source_groups["us:" + us_group[r.path]].add(case.group)
    assert all(len(g) == 1 for g in source_groups.values())
    # patient ids are the MG patient ids; US records take the breast's side
    for case in cases.values():
        assert all(r.patient_id == case.patient_id and r.side is case.side for r in case.us)


def test_virtual_cohort_is_seeded_and_keeps_mg_only_on_request(tmp_path: Path):
    mg, us = _toy_cohort()
    a, b = build_virtual_cohort(mg, us, seed=1), build_virtual_cohort(mg, us, seed=1)
    assert a.records == b.records and a.report == b.report
    differs = any(build_virtual_cohort(mg, us, seed=s).records != a.records for s in range(2, 12))
    assert differs
    kept = build_virtual_cohort(mg, us, seed=1, keep_mg_only=True)
    assert kept.report["classes"]["normal"]["kept_mg_only"] == 1 and kept.report["breasts_dropped"] == 0
    cases = Manifest(kept.records).cases()
    assert len(cases) == 7 and sum(1 for c in cases.values() if not c.us) == 1


def test_virtual_cohort_write_roundtrip(tmp_path: Path, fake_mias: Path, fake_busi: Path):
    cohort = build_virtual_cohort(load_mias(fake_mias), load_busi(fake_busi), seed=0)
    assert isinstance(cohort, VirtualCohort)
    path = cohort.write(tmp_path / "out" / "manifest.csv")
    assert (tmp_path / "out" / "manifest.report.json").is_file()
    manifest = read_manifest(path)
    assert len(manifest) == len(cohort.records)


def test_virtual_cohort_keeps_each_images_subgroup_attributes():
    mg, us = _toy_cohort()
    mg = [replace(r, source="CDD-CESM", age_bin="50-59", density="B") for r in mg]
    us = [replace(r, source="BUSI") for r in us]
    cases = Manifest(build_virtual_cohort(mg, us, seed=0).records).cases()
    for case in cases.values():
        assert case_attributes(case, "source") == "BUSI+CDD-CESM"
        assert case_attributes(case, "age_bin") == "50-59" and case_attributes(case, "density") == "B"
        assert {r.source for r in case.us} == {"BUSI"} and not any(r.age_bin for r in case.us)


def test_virtual_cohort_ignores_unlabeled_inputs():
    mg, us = _toy_cohort()
    mg += [ImageRecord("W9", Side.LEFT, Modality.MG, "/mg/W9.png", View.CC, Kind.STANDARD, None, "W9")]
    us += [_us("x", None, "gx")]
    cohort = build_virtual_cohort(mg, us, seed=0)
    assert cohort.report["mg_breasts_unlabeled_ignored"] == 1
    assert cohort.report["us_images_unlabeled_ignored"] == 1
    assert all(r.patient_id != "W9" and not r.path.endswith("x.png") for r in cohort.records)


# ---------------------------------------------------------------- real data (../shared/datasets)


def _folds(records: list[ImageRecord], seed: int = 0) -> tuple[dict[str, int], dict[str, object]]:
    cases = Manifest(records).cases()
    ids = list(dict.fromkeys(case_id(r.patient_id, r.side) for r in records))
    assert set(ids) == set(cases)
    fold_of = assign_folds(ids, [cases[c].label.index for c in ids], [cases[c].group for c in ids], 10, seed)
    return fold_of, cases


@pytest.fixture(scope="module")
def real_busi() -> tuple[list[ImageRecord], dict]:
    requires_shared_datasets()
    report: dict = {}
    return load_busi(SHARED_DATASETS / "BUSI", report=report), report


@pytest.fixture(scope="module")
def real_cdd() -> tuple[list[ImageRecord], dict]:
    requires_shared_datasets()
    report: dict = {}
    return load_cdd_cesm(SHARED_DATASETS / "CDD-CESM", report=report), report


def test_real_busi_counts_match_readme(real_busi):
    requires_shared_datasets()
    records, report = real_busi
    assert Counter(r.label.value for r in records) == {"normal": 109, "benign": 353, "malignant": 173}
    assert report["skipped"] == []
    assert not any("_mask" in Path(r.path).name for r in records)
    assert validate(records) == []
    # near-duplicates exist in BUSI: the hash must find some, and not merge everything
    assert 300 < report["near_duplicate_groups"] < len(records)
    assert report["largest_group"] < 60
    assert all(busi_masks(r.path) for r in records)  # every BUSI image ships with a mask


def test_real_busi_near_duplicate_groups_never_straddle_folds(real_busi):
    requires_shared_datasets()
    records, _ = real_busi
    for seed in (0, 1):
        fold_of, cases = _folds(records, seed)
        folds_of_group = defaultdict(set)
        for cid, case in cases.items():
            folds_of_group[case.group].add(fold_of[cid])
        assert all(len(f) == 1 for f in folds_of_group.values())
        assert len(set(fold_of.values())) == 10


def test_real_mias_counts_match_readme():
    requires_shared_datasets()
    report: dict = {}
    records = load_mias(SHARED_DATASETS / "mini-MIAS", report=report)
    # README: 167 normal / 49 benign / 42 malignant images; mdb144 (benign + malignant rows) counts as malignant
    assert Counter(r.label.value for r in records) == {"normal": 167, "benign": 49, "malignant": 42}
    assert report["women"] == 129 and report["unlabeled"] == [] and report["not_listed"] == []
    assert validate(records) == []
    by_woman = defaultdict(set)
    for r in records:
        by_woman[r.patient_id].add(r.side)
        assert r.group == r.patient_id
    assert all(sides <= {Side.LEFT, Side.RIGHT} for sides in by_woman.values())
    lesions = mias_lesions(SHARED_DATASETS / "mini-MIAS")
    assert set(lesions) == {r.path for r in records}
    for r in records:
        for x, y, radius in lesions[r.path]:
            assert 0 <= x < 1024 and 0 <= y <= 1024 and radius > 0
            assert r.label is not Label.NORMAL


def test_real_cdd_cesm_labels_agree_with_the_sheet(real_cdd):
    requires_shared_datasets()
    records, report = real_cdd
    folder = SHARED_DATASETS / "CDD-CESM" / "Subtracted images of CDD-CESM"
    cm_files = [p for p in folder.iterdir() if "_CM_" in p.name]
    assert len(records) == len(cm_files) and report["unlabeled"] == [] and report["skipped"] == []
    assert 240 <= report["patients"] <= 280  # README: ~260
    assert validate(records) == []
    # independent check against the sheet: the CESM row of each image, unless its breast's views disagree
    sheet = pd.read_excel(SHARED_DATASETS / "CDD-CESM" / "Radiology-manual-annotations.xlsx", sheet_name="all")
    sheet.columns = [str(c).strip() for c in sheet.columns]
    label_col = next(c for c in sheet.columns if c.lower().startswith("pathology"))
    rows = {str(n).strip(): Label.parse(str(v)) for n, v in zip(sheet["Image_name"], sheet[label_col], strict=True)
            if "_CM_" in str(n)}
    conflicts = {c.split(" ")[0] for c in report["breast_label_conflicts"]}
    for r in records:
        if r.case_id not in conflicts:
            assert r.label is rows[Path(r.path).stem]
    assert len(conflicts) <= 5
    for r in records:
        assert r.group == r.patient_id and r.kind is Kind.STANDARD and r.view in (View.CC, View.MLO)
    # subgroup attributes: every image has an age bin and a machine; density (DM rows only) for most
    assert {r.source for r in records} == {"CDD-CESM"} and all(r.age_bin and r.model_name for r in records)
    assert {r.density for r in records} <= {"A", "B", "C", "D", ""}
    assert sum(bool(r.density) for r in records) > 0.8 * len(records)


def test_real_virtual_cohort_cdd_cesm_x_busi(real_busi, real_cdd):
    requires_shared_datasets()
    busi, _ = real_busi
    cdd, cdd_report = real_cdd
    cohort = build_virtual_cohort(cdd, busi, seed=0)
    records = cohort.records
    assert validate(records) == []
    us_out = [r for r in records if r.modality is Modality.US]
    assert len({r.path for r in us_out}) == len(us_out)  # each US image at most once
    busi_by_path = {r.path: r for r in busi}
    cases = Manifest(records).cases()
    for case in cases.values():
        assert case.us, case.case_id  # default: no MG-only breast
        assert all(busi_by_path[r.path].label is case.label for r in case.us)
    rep = cohort.report["classes"]
    for label in Label:
        n_mg, n_us = cdd_report["breast_classes"][label.value], Counter(r.label for r in busi)[label]
        assert rep[label.value]["mg_breasts"] == n_mg
        assert rep[label.value]["kept"] == min(n_mg, n_us)
        assert rep[label.value]["dropped_no_us"] == max(0, n_mg - n_us)
        assert rep[label.value]["us_per_breast_max"] - rep[label.value]["us_per_breast_min"] <= 1
    # no source (CDD-CESM woman, BUSI near-duplicate group) straddles two folds
    fold_of, cases = _folds(records, seed=0)
    folds_of_source = defaultdict(set)
    for cid, case in cases.items():
        folds_of_source["mg:" + case.patient_id].add(fold_of[cid])
        for r in case.us:
            folds_of_source["us:" + busi_by_path[r.path].group].add(fold_of[cid])
    assert all(len(f) == 1 for f in folds_of_source.values())
    assert cohort.report["largest_group_breasts"] < len(cases) / 5  # groups stay small enough to balance folds


def test_real_virtual_cohort_mias_x_busi(real_busi):
    requires_shared_datasets()
    busi, _ = real_busi
    mias = load_mias(SHARED_DATASETS / "mini-MIAS")
    cohort = build_virtual_cohort(mias, busi, seed=1, keep_mg_only=True)
    assert validate(cohort.records) == []
    us_out = [r for r in cohort.records if r.modality is Modality.US]
    assert len({r.path for r in us_out}) == len(us_out)
    assert len(Manifest(cohort.records).cases()) == len(mias)  # every breast kept, some MG-only
