"""CDD-CESM (Khaled et al. 2022, TCIA) subtracted contrast images, from the official layout.

Layout: ``root/Subtracted images of CDD-CESM/P<id>_<L|R>_CM_<CC|MLO>.{jpg,png}`` and
``root/Radiology-manual-annotations.xlsx`` (the folder and the sheet are also found a
few levels below ``root``, as in TCIA's ``PKG - CDD-CESM`` package, and ``root`` may be
the image folder itself with the sheet beside it).

Conventions of this adapter
  * one breast (patient + side) = one case, with up to two views (CC, MLO).
  * modality MG, view from the file name. Kind: these are contrast-*subtracted*
    images, recorded as ``Kind.STANDARD`` because the MG branch has only the 2D and
    synthesized-2D kinds. There is **no second image kind** in this dataset: the
    paper's synthesized 2D (C-View) has no analogue here, so slots ``CC-synthesized``
    and ``MLO-synthesized`` stay empty, and the paper's "without C-View" ablation
    becomes, on CDD-CESM, "with vs without the second view". (The low-energy
    ``_DM_`` images of the official distribution are ordinary-looking mammograms,
    not synthesized 2D; they are not part of this adapter.)
  * label: from the sheet row of the image itself (Type CESM, matched by
    Image_name, else by Patient_ID + Side + View). The label can differ between an
    image's DM and CESM rows, so DM rows are never used. An image listed twice with
    two labels takes the more severe one.
  * a breast whose two views carry different labels takes the **more severe** label
    (malignant > benign > normal) for both images, because the label belongs to the
    case; the conflicts are logged and listed in ``report["breast_label_conflicts"]``
    (2 in the development portion of ``../shared/datasets``).
  * patient id ``CDD-P<id>``; side from the file name; group = patient id, so both
    breasts of one woman always fall in one fold.
  * images are 512x512 with the aspect ratio NOT preserved (a third party resized
    them); preprocessing, not this adapter, has to live with that.
  * subgroup attributes (``records.SUBGROUP_COLUMNS``), from the sheet: source
    "CDD-CESM"; age_bin from ``Age`` (a 10-year bin; the exact age is not kept);
    density from ``Breast density (ACR)`` (A-D; "_" or blank = unknown); model_name
    "machine N" from ``Machine`` (the sheet numbers the devices, it does not name
    them). Each value comes from the image's own CESM row, else from the DM row of
    the same breast and view, else from any row of that breast: the sheet gives
    the density on the DM rows only.

Files that do not follow the naming, and images without a CESM row, are skipped
with a warning; the optional ``report`` dict receives the counts.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from pathlib import Path

from ..errors import BreastFusionError
from ..records import ImageRecord, age_bin, clean_attribute
from ..vocab import Kind, Label, Modality, Side, View

log = logging.getLogger(__name__)

IMAGE_FOLDER = "Subtracted images of CDD-CESM"
ANNOTATIONS = "Radiology-manual-annotations.xlsx"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PREFERRED_SHEET = "all"
SOURCE = "CDD-CESM"
DENSITIES = ("A", "B", "C", "D")  # ACR BI-RADS breast density

_NAME_RE = re.compile(r"^P(\d+)_([LR])_(CM|DM)_(CC|MLO)$", re.IGNORECASE)


def _severity(label: Label) -> int:
    return label.index  # normal 0 < benign 1 < malignant 2


def most_severe(labels) -> Label:
    return max(labels, key=_severity)


def _norm(name) -> str:
    text = re.sub(r"\s*/\s*", "/", str(name))
    return re.sub(r"[\s_]+", " ", text).strip().lower()


def _find(root: Path, name: str, want_dir: bool, depth: int = 4) -> Path | None:
    """root/name, else the first match at most `depth` levels below root (sorted), else None."""
    direct = root / name
    if (direct.is_dir() if want_dir else direct.is_file()):
        return direct
    frontier = [root]
    for _ in range(depth):
        nxt: list[Path] = []
        for folder in frontier:
            try:
                children = sorted(folder.iterdir())
            except OSError:
                continue
            for child in children:
                if child.name == name and (child.is_dir() if want_dir else child.is_file()):
                    return child
                if child.is_dir():
                    nxt.append(child)
        frontier = nxt
    return None


def locate(root: str | os.PathLike) -> tuple[Path, Path]:
    """(image folder, annotation sheet) of a CDD-CESM copy rooted at ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise BreastFusionError(f"{root}: CDD-CESM folder not found")
    images = _find(root, IMAGE_FOLDER, want_dir=True)
    if images is None and any(_NAME_RE.match(p.stem) for p in root.iterdir() if p.is_file()):
        images = root  # root is the image folder itself
    if images is None:
        raise BreastFusionError(f"{root}: no '{IMAGE_FOLDER}' folder found")
    sheet = _find(root, ANNOTATIONS, want_dir=False) or _find(images.parent, ANNOTATIONS, want_dir=False, depth=1)
    if sheet is None:
        candidates = sorted(root.glob("*.xlsx")) + sorted(images.parent.glob("*.xlsx"))
        sheet = next((p for p in candidates if "annotation" in p.name.lower()), None)
    if sheet is None:
        raise BreastFusionError(f"{root}: annotation sheet '{ANNOTATIONS}' not found")
    return images.resolve(), sheet.resolve()


def _columns(frame) -> dict[str, str] | None:
    """Map of our column keys to the sheet's (possibly messy) column names; None when unusable."""
    by_norm = {_norm(c): c for c in frame.columns}
    found: dict[str, str] = {}
    for key, wanted in (("name", "image name"), ("patient", "patient id"), ("side", "side"),
                        ("type", "type"), ("view", "view")):
        if wanted in by_norm:
            found[key] = by_norm[wanted]
    label = next((orig for norm, orig in by_norm.items() if norm.startswith("pathology")), None)
    if label is None:
        return None
    found["label"] = label
    if "name" not in found and not {"patient", "side", "view", "type"} <= found.keys():
        return None
    return found


def read_annotation_frame(sheet: str | os.PathLike):
    """The sheet with image labels: tab 'all' when usable, else the first tab that has the columns."""
    import pandas as pd

    sheet = Path(sheet)
    if sheet.suffix.lower() == ".csv":
        frame = pd.read_csv(sheet, dtype=str, keep_default_na=False)
        if _columns(frame) is None:
            raise BreastFusionError(f"{sheet}: no image-name and 'Pathology Classification' columns")
        return frame
    try:
        book = pd.ExcelFile(sheet, engine="openpyxl")
    except ImportError as exc:
        raise BreastFusionError(f"{sheet}: reading .xlsx needs the 'openpyxl' package ({exc})") from exc
    except (OSError, ValueError) as exc:
        raise BreastFusionError(f"{sheet}: cannot read the annotation sheet ({exc})") from exc
    with book:
        names = sorted(book.sheet_names, key=lambda n: _norm(n) != PREFERRED_SHEET)  # 'all' first, stable
        for name in names:
            frame = pd.read_excel(book, sheet_name=name, dtype=str, keep_default_na=False)
            if _columns(frame) is not None:
                return frame
    raise BreastFusionError(f"{sheet}: no tab has an image-name and a 'Pathology Classification' column")


def read_cdd_cesm_labels(sheet: str | os.PathLike, report: dict | None = None) -> dict[tuple[int, Side, View], Label]:
    """(patient number, side, view) -> label of the CESM (subtracted) image, from the sheet."""
    return _labels_of_frame(read_annotation_frame(sheet), report)


def _row_key(row: dict, cols: dict[str, str]) -> tuple[int, Side, View, bool] | None:
    """(patient, side, view, is a CESM row) of a sheet row, from its image name or its columns."""
    def cell(key: str) -> str:
        return str(row.get(cols[key], "") if key in cols else "").strip()

    match = _NAME_RE.match(Path(cell("name")).stem if cell("name") else "")
    if match:
        return (int(match.group(1)), Side.parse(match.group(2)), View.parse(match.group(4)),
                match.group(3).upper() == "CM")
    if {"patient", "side", "view", "type"} <= cols.keys():
        try:
            patient = int(float(re.sub(r"^P", "", cell("patient"), flags=re.IGNORECASE)))
            return patient, Side.parse(cell("side")), View.parse(cell("view")), cell("type").upper() in ("CESM", "CM")
        except ValueError:
            return None
    return None


def _attribute_columns(frame) -> dict[str, str]:
    """Sheet columns of the subgroup attributes: age, density, machine (those present)."""
    found: dict[str, str] = {}
    for column in frame.columns:
        norm = _norm(column)
        if norm == "age":
            found.setdefault("age", column)
        elif "density" in norm:
            found.setdefault("density", column)
        elif norm.startswith("machine"):
            found.setdefault("machine", column)
    return found


def _attributes_of_row(row: dict, cols: dict[str, str]) -> dict[str, str]:
    """age_bin, density, model_name of one sheet row ("" for what it does not give)."""
    def cell(key: str) -> str:
        return str(row.get(cols[key], "") if key in cols else "").strip()

    try:
        years = float(cell("age")) if cell("age") else None
    except ValueError:
        years = None
    density = cell("density").upper()
    machine = cell("machine")
    if re.fullmatch(r"\d+(\.0+)?", machine):
        machine = str(int(float(machine)))
    return {
        "age_bin": age_bin(years),
        "density": density if density in DENSITIES else "",  # "_" or blank: unknown
        "model_name": clean_attribute(f"machine {machine}") if machine else "",
    }


def cdd_cesm_attributes(frame) -> dict[tuple[int, Side, View], dict[str, str]]:
    """(patient, side, view) -> {age_bin, density, model_name} of that breast's image, from the sheet.

    Each value comes from the image's CESM row, else its DM row (same breast and view), else
    any row of the breast (the sheet gives the density on DM rows only)."""
    cols = _columns(frame) or {}
    attr_cols = _attribute_columns(frame)
    ranked: dict[tuple[int, Side], list[tuple[int, View, dict[str, str]]]] = defaultdict(list)
    for row in frame.to_dict("records"):
        key = _row_key(row, cols)
        if key is None:
            continue
        patient, side, view, is_cesm = key
        ranked[(patient, side)].append((0 if is_cesm else 1, view, _attributes_of_row(row, attr_cols)))
    out: dict[tuple[int, Side, View], dict[str, str]] = {}
    for (patient, side), rows in ranked.items():
        for view in {v for _, v, _ in rows}:
            order = sorted(rows, key=lambda r, view=view: (r[1] != view, r[0]))  # own view first, CESM first
            out[(patient, side, view)] = {
                column: next((attrs[column] for _, _, attrs in order if attrs[column]), "")
                for column in ("age_bin", "density", "model_name")
            }
    return out


def _labels_of_frame(frame, report: dict | None = None) -> dict[tuple[int, Side, View], Label]:
    cols = _columns(frame)
    assert cols is not None
    found: dict[tuple[int, Side, View], set[Label]] = defaultdict(set)
    bad_rows = 0
    for row in frame.to_dict("records"):
        def cell(key: str, row=row) -> str:
            return str(row.get(cols[key], "") if key in cols else "").strip()

        key = None
        match = _NAME_RE.match(Path(cell("name")).stem if cell("name") else "")
        if match:
            if match.group(3).upper() != "CM":
                continue  # a low-energy (DM) row: never the label of a subtracted image
            key = (int(match.group(1)), Side.parse(match.group(2)), View.parse(match.group(4)))
        elif {"patient", "side", "view", "type"} <= cols.keys():
            if cell("type").upper() not in ("CESM", "CM"):
                continue
            try:
                patient = int(float(re.sub(r"^P", "", cell("patient"), flags=re.IGNORECASE)))
                key = (patient, Side.parse(cell("side")), View.parse(cell("view")))
            except ValueError:
                key = None
        try:
            label = Label.parse(cell("label")) if key is not None else None
        except ValueError:
            label = None
        if key is None or label is None:
            if any(str(v).strip() for v in row.values()):
                bad_rows += 1
            continue
        found[key].add(label)
    duplicates = {k: v for k, v in found.items() if len(v) > 1}
    for (patient, side, view), labels in sorted(duplicates.items()):
        log.warning("CDD-CESM: P%d_%s_CM_%s has rows with labels %s; using the most severe",
                    patient, side.value, view.value, ", ".join(sorted(lab.value for lab in labels)))
    if report is not None:
        report["sheet_rows_unusable"] = bad_rows
        report["sheet_rows_with_two_labels"] = len(duplicates)
    return {key: most_severe(labels) for key, labels in found.items()}


def load_cdd_cesm(root: str | os.PathLike, *, report: dict | None = None) -> list[ImageRecord]:
    """CDD-CESM subtracted-image records (MG, CC/MLO, kind 2D, group = patient), labels per image.

    ``report`` (optional dict) receives: images, breasts, patients, per-class counts of
    images and of breasts, skipped files, unlabeled images, breast label conflicts.
    """
    image_dir, sheet = locate(root)
    info: dict = {}
    frame = read_annotation_frame(sheet)
    labels = _labels_of_frame(frame, info)
    attributes = cdd_cesm_attributes(frame)
    chosen: dict[tuple[int, Side, View], Path] = {}
    skipped: list[str] = []
    unlabeled: list[str] = []
    for path in sorted(image_dir.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        match = _NAME_RE.match(path.stem)
        if not match or match.group(3).upper() != "CM":
            skipped.append(f"{path.name}: not a P<id>_<L|R>_CM_<CC|MLO> subtracted image")
            continue
        key = (int(match.group(1)), Side.parse(match.group(2)), View.parse(match.group(4)))
        if key in chosen:
            skipped.append(f"{path.name}: same image as {chosen[key].name}")
            continue
        if key not in labels:
            unlabeled.append(path.name)
            continue
        chosen[key] = path
    for line in skipped:
        log.warning("CDD-CESM: skipped %s", line)
    for name in unlabeled:
        log.warning("CDD-CESM: skipped %s: no CESM row in %s", name, sheet.name)

    breast_labels: dict[tuple[int, Side], set[Label]] = defaultdict(set)
    for (patient, side, view) in chosen:
        breast_labels[(patient, side)].add(labels[(patient, side, view)])
    conflicts = []
    for (patient, side), found in sorted(breast_labels.items()):
        if len(found) > 1:
            text = f"CDD-P{patient}:{side.value} ({', '.join(sorted(lab.value for lab in found))})"
            log.warning("CDD-CESM: views of %s disagree; using the most severe label", text)
            conflicts.append(text)

    records = []
    for (patient, side, view), path in sorted(chosen.items(), key=lambda kv: (kv[0][0], kv[0][1].value,
                                                                               kv[0][2].value)):
        pid = f"CDD-P{patient}"
        records.append(ImageRecord(
            patient_id=pid, side=side, modality=Modality.MG, path=str(path), view=view,
            kind=Kind.STANDARD, label=most_severe(breast_labels[(patient, side)]), group=pid,
            source=SOURCE, **attributes.get((patient, side, view), {}),
        ))
    if report is not None:
        breasts = {(r.patient_id, r.side): r.label for r in records}
        report.update({
            "dataset": "CDD-CESM",
            "images": len(records),
            "breasts": len(breasts),
            "patients": len({r.patient_id for r in records}),
            "image_classes": {lab.value: sum(r.label is lab for r in records) for lab in Label},
            "breast_classes": {lab.value: sum(v is lab for v in breasts.values()) for lab in Label},
            "views_per_breast": {str(k): v for k, v in sorted(_count_views(records).items())},
            "skipped": skipped,
            "unlabeled": unlabeled,
            "breast_label_conflicts": conflicts,
            **info,
        })
    return records


def _count_views(records: list[ImageRecord]) -> dict[int, int]:
    per_breast: dict[str, int] = defaultdict(int)
    for rec in records:
        per_breast[rec.case_id] += 1
    out: dict[int, int] = defaultdict(int)
    for n in per_breast.values():
        out[n] += 1
    return dict(out)
