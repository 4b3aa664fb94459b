"""Manifest records: one row per image, validated, read from and written to CSV.

A *case* is one breast of one patient (the paper's screening unit; the label
belongs to the case). A *group* ties cases that must never be split across
folds (both breasts of one woman, near-duplicate sources); it defaults to the
patient id.

Optional subgroup columns (`SUBGROUP_COLUMNS`: source, age_bin, manufacturer,
model_name, density) describe an image for subgroup analysis and the cohort
table (`evaluation.cohort`). They hold coarse, PHI-safe values only: an age is
always a 10-year bin ("50-59", top-coded "90+"), never an exact age; names are
cleaned to letters, digits, spaces, "-", "." and "_" (64 characters at most).
A manifest without them reads and writes exactly as before, and its
`content_hash` does not change. One breast may hold images with different
values (MG and US from two devices, a virtual case of two datasets):
`case_attributes` joins them.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import ManifestError
from .files import atomic_path
from .vocab import MG_SLOTS, Kind, Label, MGSlot, Modality, Side, View

COLUMNS: tuple[str, ...] = ("patient_id", "side", "modality", "view", "kind", "path", "label", "group")
REQUIRED: tuple[str, ...] = ("patient_id", "side", "modality", "path")
SUBGROUP_COLUMNS: tuple[str, ...] = ("source", "age_bin", "manufacturer", "model_name", "density")
AGE_BIN_WIDTH = 10
AGE_TOP = 90  # ages from 90 on are one bin, "90+" (HIPAA Safe Harbor)
AGE_BINS: tuple[str, ...] = (*(f"{lo}-{lo + AGE_BIN_WIDTH - 1}" for lo in range(0, AGE_TOP, AGE_BIN_WIDTH)),
                             f"{AGE_TOP}+")
ATTRIBUTE_MAX_CHARS = 64
_NOT_ATTRIBUTE = re.compile(r"[^A-Za-z0-9 ._-]")


@dataclass(frozen=True)
class ImageRecord:
    """One image of one breast. `path` is absolute once a manifest is loaded."""

    patient_id: str
    side: Side
    modality: Modality
    path: str
    view: View = View.NONE
    kind: Kind = Kind.NONE
    label: Label | None = None
    group: str = ""
    source: str = ""
    age_bin: str = ""
    manufacturer: str = ""
    model_name: str = ""
    density: str = ""

    def __post_init__(self) -> None:
        """Clean the subgroup values (see `clean_attribute`, `age_bin`); a bad age bin raises ValueError."""
        for column in SUBGROUP_COLUMNS:
            value = getattr(self, column)
            if value:
                object.__setattr__(self, column, _subgroup_value(column, value))

    @property
    def case_id(self) -> str:
        return case_id(self.patient_id, self.side)

    @property
    def group_id(self) -> str:
        return self.group or self.patient_id

    @property
    def slot(self) -> MGSlot | None:
        """The MG branch input slot of this image, or None (US, or a flagged view)."""
        if self.modality is not Modality.MG:
            return None
        slot = MGSlot(self.view, self.kind)
        return slot if slot in MG_SLOTS else None


def case_id(patient_id: str, side: Side | str) -> str:
    return f"{patient_id}:{Side.parse(side).value}"


def age_bin(years: float | int | None) -> str:
    """A 10-year age bin ("40-49"), top-coded "90+"; "" for None, NaN or a negative age.

    Exact ages are never kept: every age that enters a record goes through here."""
    if years is None:
        return ""
    try:
        value = float(years)
    except (TypeError, ValueError):
        return ""
    if math.isnan(value) or value < 0:
        return ""
    if value >= AGE_TOP:
        return AGE_BINS[-1]
    return AGE_BINS[int(value // AGE_BIN_WIDTH)]


def clean_attribute(text: object) -> str:
    """Letters, digits, spaces, "-", "." and "_" only, spaces collapsed, 64 characters at most."""
    cleaned = " ".join(_NOT_ATTRIBUTE.sub("", str(text)).split())
    return cleaned[:ATTRIBUTE_MAX_CHARS].strip()


def _subgroup_value(column: str, value: object) -> str:
    """The cleaned value of one subgroup column. An age_bin cell must be a bin of `AGE_BINS` or
    a number of years (binned here); the error never quotes the cell, which may be an exact age."""
    if column != "age_bin":
        return clean_attribute(value)
    text = str(value).strip()
    if not text:
        return ""
    if text in AGE_BINS:
        return text
    return years_to_bin(text, "age_bin is not a 10-year bin (0-9, 10-19, ..., 80-89, 90+) nor an age in years")


def years_to_bin(text: str, problem: str = "age is not a number of years") -> str:
    """An age in years (text) -> its 10-year bin; ValueError(`problem`), never quoting the age, when
    it is not one."""
    try:
        years = float(text)
    except ValueError:
        years = -1.0
    binned = age_bin(years)
    if not binned:
        raise ValueError(problem)
    return binned


def case_attributes(case_or_records: Case | Iterable[ImageRecord], column: str) -> str:
    """The distinct non-empty values of `column` over a breast's images, sorted and joined with "+"
    ("" when none): e.g. source "BUSI+CDD-CESM" for a virtual case. A `Case` gives its MG slot
    images and its US images."""
    if column not in SUBGROUP_COLUMNS:
        raise ValueError(f"unknown subgroup column {column!r} (expected one of: {', '.join(SUBGROUP_COLUMNS)})")
    records = ([*case_or_records.mg.values(), *case_or_records.us] if isinstance(case_or_records, Case)
               else case_or_records)
    return "+".join(sorted({value for rec in records if (value := getattr(rec, column))}))


@dataclass
class Case:
    """One breast: its label, fold group, MG images by slot and US images."""

    case_id: str
    patient_id: str
    side: Side
    label: Label | None
    group: str
    mg: dict[MGSlot, ImageRecord] = field(default_factory=dict)
    us: list[ImageRecord] = field(default_factory=list)


@dataclass
class Manifest:
    records: list[ImageRecord]
    source: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def cases(self) -> dict[str, Case]:
        """Group records per breast, in first-seen order. Assumes a validated manifest."""
        out: dict[str, Case] = {}
        for rec in self.records:
            case = out.get(rec.case_id)
            if case is None:
                case = out[rec.case_id] = Case(
                    rec.case_id, rec.patient_id, rec.side, rec.label, rec.group_id
                )
            if rec.modality is Modality.US:
                case.us.append(rec)
            elif rec.slot is not None and rec.slot not in case.mg:
                case.mg[rec.slot] = rec
        return out

    def content_hash(self) -> str:
        """Hash of the manifest's rows (paths as given), for run provenance."""
        digest = hashlib.sha256()
        for rec in self.records:
            digest.update("|".join(_row(rec, None).values()).encode())
            extra = _subgroup_row(rec)
            if any(extra.values()):  # rows without subgroup values hash as before these columns existed
                digest.update(("|" + "|".join(extra.values())).encode())
            digest.update(b"\n")
        return digest.hexdigest()[:16]

    def class_counts(self) -> dict[str, int]:
        counts = {label.value: 0 for label in Label}
        for case in self.cases().values():
            if case.label is not None:
                counts[case.label.value] += 1
        return counts


def _row(rec: ImageRecord, root: Path | None) -> dict[str, str]:
    path = rec.path
    if root is not None:
        try:
            path = os.path.relpath(rec.path, root)
        except ValueError:  # another drive on Windows
            path = rec.path
    return {
        "patient_id": rec.patient_id,
        "side": rec.side.value,
        "modality": rec.modality.value,
        "view": rec.view.value,
        "kind": rec.kind.value,
        "path": Path(path).as_posix(),
        "label": rec.label.value if rec.label is not None else "",
        "group": rec.group,
    }


def _subgroup_row(rec: ImageRecord) -> dict[str, str]:
    return {column: getattr(rec, column) for column in SUBGROUP_COLUMNS}


def write_manifest(records: Iterable[ImageRecord], path: str | os.PathLike) -> Path:
    """Write records as CSV with paths relative to the CSV's folder (atomic).

    The columns are `COLUMNS`, then those of `SUBGROUP_COLUMNS` that at least one record fills."""
    path = Path(path)
    records = list(records)
    extra = [column for column in SUBGROUP_COLUMNS if any(getattr(rec, column) for rec in records)]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*COLUMNS, *extra])
        writer.writeheader()
        for rec in records:
            writer.writerow({**_row(rec, path.parent.resolve()), **{c: getattr(rec, c) for c in extra}})
    return path


def read_manifest(path: str | os.PathLike, *, check_files: bool = True,
                  require_labels: bool = True, data_root: str | os.PathLike | None = None) -> Manifest:
    """Read and validate a manifest CSV; raise ManifestError listing every problem.

    With `data_root`, every image path (after resolving "..", links and absolute
    paths) must lie inside it: a manifest cannot make the tool read files elsewhere."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    root = path.parent.resolve()
    problems: list[str] = []
    records: list[ImageRecord] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:  # -sig: a BOM from spreadsheets is fine
            reader = csv.DictReader(fh)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}")
            for lineno, row in enumerate(reader, start=2):
                try:
                    records.append(_parse_row(row, root))
                except ValueError as exc:
                    problems.append(f"{path.name} line {lineno}: {exc}")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text (byte {exc.start}); save the CSV as UTF-8") from None
    except csv.Error as exc:
        raise ManifestError(f"{path}: not a readable CSV near line {reader.line_num} ({exc}); "
                            "an unbalanced quote is the usual cause") from None
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if data_root is not None:
        inside = Path(data_root).resolve()
        problems += [f"{path.name}: {rec.path} lies outside the data root {inside}"
                     for rec in records if not Path(rec.path).resolve().is_relative_to(inside)]
    problems += validate(records, check_files=check_files, require_labels=require_labels)
    if problems:
        raise ManifestError(_summarise(path, problems))
    return Manifest(records, source=str(path))


def _parse_row(row: dict[str, str], root: Path) -> ImageRecord:
    def cell(name: str) -> str:
        return (row.get(name) or "").strip()

    patient = cell("patient_id")
    if not patient:
        raise ValueError("empty patient_id")
    raw_path = cell("path")
    if not raw_path:
        raise ValueError("empty path")
    modality = Modality.parse(cell("modality"))
    label_text = cell("label")
    return ImageRecord(
        patient_id=patient,
        side=Side.parse(cell("side")),
        modality=modality,
        path=str((root / raw_path).resolve()),
        view=View.parse(cell("view")),
        kind=Kind.parse(cell("kind")),
        label=Label.parse(label_text) if label_text else None,
        group=cell("group"),
        **{column: cell(column) for column in SUBGROUP_COLUMNS},  # cleaned by ImageRecord
    )


def validate(records: Sequence[ImageRecord], *, check_files: bool = True,
             require_labels: bool = True) -> list[str]:
    """Return one line per problem in a list of records (empty when valid)."""
    problems: list[str] = []
    labels: dict[str, set[Label]] = defaultdict(set)
    groups: dict[str, set[str]] = defaultdict(set)
    seen_paths: dict[str, str] = {}
    for rec in records:
        where = f"{rec.case_id} {Path(rec.path).name}"
        if rec.modality is Modality.MG and rec.view in (View.NONE,):
            problems.append(f"{where}: MG image without a view (CC, MLO or OTHER)")
        if rec.modality is Modality.MG and rec.kind is Kind.NONE:
            problems.append(f"{where}: MG image without a kind (2D or synthesized)")
        if rec.modality is Modality.US and (rec.view is not View.NONE or rec.kind is not Kind.NONE):
            problems.append(f"{where}: US image must have empty view and kind")
        if rec.label is None and require_labels:
            problems.append(f"{where}: no label")
        if rec.label is not None:
            labels[rec.case_id].add(rec.label)
        groups[rec.case_id].add(rec.group_id)
        if rec.path in seen_paths:
            problems.append(f"{where}: file already listed for {seen_paths[rec.path]}")
        seen_paths[rec.path] = rec.case_id
        if check_files and not os.path.isfile(rec.path):
            problems.append(f"{where}: file not found: {rec.path}")
    for cid, found in labels.items():
        if len(found) > 1:
            names = ", ".join(sorted(label.value for label in found))
            problems.append(f"{cid}: case has two labels ({names})")
    for cid, found in groups.items():
        if len(found) > 1:
            problems.append(f"{cid}: case has several groups ({', '.join(sorted(found))})")
    return problems


def _summarise(path: Path, problems: list[str], limit: int = 20) -> str:
    head = f"{path}: {len(problems)} problem(s)"
    lines = problems[:limit]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more")
    return "\n".join([head, *("  " + line for line in lines)])


def relabel(records: Iterable[ImageRecord], labels: dict[str, Label]) -> list[ImageRecord]:
    """Return records with labels taken from a case_id -> Label mapping."""
    return [replace(r, label=labels.get(r.case_id, r.label)) for r in records]
