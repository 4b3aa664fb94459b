"""Manifest records: one row per image, validated, read from and written to CSV.

A *case* is one breast of one patient (the paper's screening unit; the label
belongs to the case). A *group* ties cases that must never be split across
folds (both breasts of one woman, near-duplicate sources); it defaults to the
patient id.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import ManifestError
from .files import atomic_path
from .vocab import MG_SLOTS, Kind, Label, MGSlot, Modality, Side, View

COLUMNS: tuple[str, ...] = ("patient_id", "side", "modality", "view", "kind", "path", "label", "group")
REQUIRED: tuple[str, ...] = ("patient_id", "side", "modality", "path")


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


def write_manifest(records: Iterable[ImageRecord], path: str | os.PathLike) -> Path:
    """Write records as CSV with paths relative to the CSV's folder (atomic)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for rec in records:
            writer.writerow(_row(rec, path.parent.resolve()))
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
