"""Walking a folder of DICOM and image files into manifest records.

`ingest_folder(root)` returns an `IngestResult`: the records, the skipped
files with their reasons, the flags (kept images with something unusual) and
the problems found with the labels; `write_ingest(result, out_csv)` writes
the manifest and a `skipped.csv` beside it, each atomically.

Walk
    Sorted and deterministic: folders and files in name order; hidden files
    and folders (name starting with ".") are ignored; links to folders are not
    followed. Whether a file is DICOM is read from its content (the "DICM"
    marker after the 128-byte preamble, or a data set without preamble),
    never from its extension. Every image is decoded once here, so a file
    that would fail later is skipped now, with its reason. Each bad file is
    skipped with a one-line reason and the walk goes on.

DICOM files
    Everything comes from the header (see `ingest.dicom` for modality, side,
    view, kind and the reasons for rejection). A second file with the same
    SOPInstanceUID is skipped as a duplicate.

Image files (PNG, JPEG, PGM, or any other raster Pillow reads) follow one of
two conventions; the sidecar wins when both apply:

1. A sidecar JSON beside the image, `NAME.json` for `NAME.png` (or
   `NAME.png.json`)::

       {"patient_id": "P001", "side": "L", "modality": "MG",
        "view": "CC", "kind": "synthesized", "label": "benign"}

   `patient_id`, `side` (L/R) and `modality` (MG/US) are required. MG needs
   `view` (CC, MLO or OTHER); its `kind` is "2D" (the default) or
   "synthesized". US has no view or kind. `label` (normal, benign,
   malignant) and `group` are optional, and so are the subgroup attributes
   `source`, `manufacturer`, `model_name`, `density` and `age_bin` (a
   10-year bin such as "50-59"), or `age` in years (binned; the exact age is
   not kept). Sidecars themselves are not listed as skipped.
2. A folder layout: the last four parts of the path under the root are
   `<patient_id>/<L|R>/<MG|US>/<file>`. An MG file name (without extension,
   case-insensitive) must name exactly one view, CC or MLO, as a token not
   glued to other letters (an L/R prefix is allowed): "CC.png",
   "img_RCC_01.png", "mlo-cview.png"; "XCCL.png" names no view. It is
   synthesized when the name contains "synth", "cview" or "c-view",
   standard 2D otherwise. US files may have any name.

Labels (optional CSV)
    Columns `patient_id`, `side`, `label` (header names case-insensitive),
    optionally `density` (BI-RADS breast density A, B, C or D, or 1-4 for
    A-D, case-insensitive; empty for unknown) and `age` (years at the study;
    only its 10-year bin is kept).
    `patient_id` is the id as found (or its pseudonym); `side` is L/R (or
    left/right), empty for every breast of the patient; labels are normal,
    benign or malignant, case-insensitive. An unknown label or side, an
    empty patient id, or two labels for one breast raise `ManifestError`
    listing every such line. A row that names no ingested breast is a line in
    `IngestResult.problems` (by line number) and in the summary. CSV labels
    override sidecar labels; a row's density and age bin, when given, override
    those of the header or sidecar.

Pseudonymisation
    With a salt, every patient id becomes "anon-" + the first 12 hex digits
    of sha256(salt + id), and so does every explicit group id. Without a
    salt, patient ids are kept as found.

Privacy
    Records hold the patient id (pseudonymised on request), side, modality,
    view, kind, label, group, the file path and the subgroup attributes (age
    as a 10-year bin only, manufacturer and model names), and nothing else
    from a header; summaries, reasons, flags and problem lines hold counts, fixed
    words, coded values and paths relative to the root. No UID is written: the
    SOPInstanceUID is read to skip duplicates and kept in memory only; outputs name
    an image by its path (and a patient by a salted hash with a salt). File and folder
    names are copied as they are (the folder layout puts the patient id in
    paths): an archive whose names carry identities must be renamed first.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import BreastFusionError, InputImageError, ManifestError
from ..files import atomic_path
from ..records import ImageRecord, validate, write_manifest, years_to_bin
from ..vocab import Kind, Label, Modality, Side, View
from .dicom import describe, header_value
from .pixels import dataset_image, input_errors, load_dicom, quiet_pydicom, read_image, sniff

PathLike = str | os.PathLike
LAYOUT = "<patient_id>/<L|R>/<MG|US>/<file>"
NO_CONVENTION = f"image file without sidecar JSON or folder layout ({LAYOUT})"
_MG_VIEW_IN_NAME = re.compile(r"(?<![A-Z])[LR]?(CC|MLO)(?![A-Z])")
_SYNTH_IN_NAME = re.compile(r"SYNTH|C-?VIEW")
SIDECAR_ATTRIBUTES = ("source", "manufacturer", "model_name", "density", "age_bin")
DENSITIES = {"a": "A", "b": "B", "c": "C", "d": "D", "1": "A", "2": "B", "3": "C", "4": "D"}


@dataclass
class IngestResult:
    """What a folder walk produced: usable records, skipped files, flags and label problems."""

    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path relative to root, reason)
    flagged: list[tuple[str, str]] = field(default_factory=list)  # (path relative to root, flag)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Counts only: patients, cases, images per modality/view/kind, labels, flags, skips."""
        recs = self.records
        mg = Counter(f"{r.view.value} {r.kind.value}" if r.view is not View.OTHER else "OTHER"
                     for r in recs if r.modality is Modality.MG)
        labels = {r.case_id: r.label for r in recs}
        label_counts = Counter(lab.value if lab else "none" for lab in labels.values())
        lines = [
            f"patients: {len({r.patient_id for r in recs})}, cases (breasts): {len(labels)}, "
            f"images: {len(recs)}",
            f"MG: {sum(mg.values())}{_counts(mg)}",
            f"US: {sum(r.modality is Modality.US for r in recs)}",
            "labels (cases): " + ", ".join(
                f"{name} {label_counts.get(name, 0)}" for name in [*(x.value for x in Label), "none"]
            ),
            f"flagged: {len(self.flagged)}",
            *_count_lines(Counter(flag for _, flag in self.flagged)),
            f"skipped: {len(self.skipped)}",
            *_count_lines(Counter(_reason_key(reason) for _, reason in self.skipped)),
        ]
        if self.problems:
            lines.append(f"problems: {len(self.problems)}")
            lines += [f"  {line}" for line in self.problems]
        return "\n".join(lines)


def ingest_folder(root: PathLike, labels_csv: PathLike | None = None,
                  pseudonymise_salt: str | None = None, progress: bool = False) -> IngestResult:
    """Walk `root` into manifest records; see the module docstring for every convention."""
    base = Path(root).resolve()
    if not base.is_dir():
        raise BreastFusionError(f"{root}: not a folder")
    label_rows = read_labels(labels_csv) if labels_csv is not None else []
    ignore = {Path(labels_csv).resolve()} if labels_csv is not None else set()
    files = [f for f in _walk(base) if f not in ignore]
    sidecars = _sidecars(files)
    result = IngestResult()
    found: list[ImageRecord] = []
    seen_uids: dict[str, str] = {}
    for count, path in enumerate(files, start=1):
        if progress and (count % 100 == 0 or count == len(files)):
            print(f"ingest: {count}/{len(files)} files", file=sys.stderr)
        if path in sidecars:
            continue
        rel = path.relative_to(base).as_posix()
        try:
            with input_errors(path), quiet_pydicom():
                record, flags = _ingest_file(path, base, seen_uids)
        except InputImageError as exc:
            result.skipped.append((rel, _reason(exc, path)))
            continue
        found.append(record)
        result.flagged += [(rel, flag) for flag in flags]
    labelled, result.problems = _apply_labels(found, label_rows, labels_csv, pseudonymise_salt)
    result.records = [_pseudonymised(r, pseudonymise_salt) for r in labelled]
    result.problems += validate(result.records, check_files=False, require_labels=False)
    return result


def write_ingest(result: IngestResult, out_csv: PathLike) -> tuple[Path, Path]:
    """Write the manifest and `skipped.csv` (path, reason) beside it, each atomically."""
    manifest = write_manifest(result.records, out_csv)
    skipped = manifest.parent / "skipped.csv"
    with atomic_path(skipped) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "reason"])
        writer.writerows(result.skipped)
    return manifest, skipped


def pseudonymise(value: str, salt: str) -> str:
    """'anon-' + the first 12 hex digits of sha256(salt + value)."""
    return "anon-" + hashlib.sha256((salt + value).encode("utf-8")).hexdigest()[:12]


# -- walking -----------------------------------------------------------------------------------


def _walk(root: Path) -> Iterator[Path]:
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                yield Path(folder) / name


def _sidecars(files: list[Path]) -> set[Path]:
    """JSON files that sit beside an image of the same name (NAME.json or NAME.png.json)."""
    present = set(files)
    stems = Counter((f.parent, f.stem) for f in files if f.suffix.lower() != ".json")
    return {
        f for f in files
        if f.suffix.lower() == ".json" and (f.with_suffix("") in present or stems[(f.parent, f.stem)])
    }


def _ingest_file(path: Path, root: Path, seen_uids: dict[str, str]) -> tuple[ImageRecord, list[str]]:
    if sniff(path) == "dicom":
        return _ingest_dicom(path, root, seen_uids)
    return _ingest_image(path, root), []


def _ingest_dicom(path: Path, root: Path, seen_uids: dict[str, str]) -> tuple[ImageRecord, list[str]]:
    ds = load_dicom(path)
    info = describe(ds)
    if info.reject_reason:
        raise InputImageError(f"{path}: {info.reject_reason}")
    uid = str(header_value(ds, "SOPInstanceUID") or "")
    if uid and uid in seen_uids:
        raise InputImageError(f"{path}: duplicate SOPInstanceUID (same image as {seen_uids[uid]})")
    dataset_image(ds, path)
    if uid:
        seen_uids[uid] = path.relative_to(root).as_posix()
    if info.modality is None or info.side is None:  # describe() rejects these; kept for the type checker
        raise InputImageError(f"{path}: no modality or side")
    record = ImageRecord(
        patient_id=info.patient_id, side=info.side, modality=info.modality, path=str(path),
        view=info.view or View.NONE, kind=info.kind or Kind.NONE,
        age_bin=info.age_bin, manufacturer=info.manufacturer, model_name=info.model_name,
    )
    return record, info.flags


def _ingest_image(path: Path, root: Path) -> ImageRecord:
    read_image(path)
    sidecar = _sidecar_of(path)
    if sidecar is not None:
        return _from_sidecar(path, sidecar)
    record = _from_layout(path, root)
    if record is None:
        raise InputImageError(f"{path}: {NO_CONVENTION}")
    return record


# -- image file conventions --------------------------------------------------------------------


def _sidecar_of(path: Path) -> Path | None:
    for candidate in (path.with_suffix(".json"), path.with_name(path.name + ".json")):
        if candidate != path and candidate.is_file():
            return candidate
    return None


def _from_sidecar(path: Path, sidecar: Path) -> ImageRecord:
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        return _record_from_meta(path, {k: str(v).strip() for k, v in meta.items() if v is not None})
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:160]
        raise InputImageError(f"{path}: bad sidecar JSON ({sidecar.name}: {detail})") from exc


def _record_from_meta(path: Path, meta: dict[str, str]) -> ImageRecord:
    missing = [key for key in ("patient_id", "side", "modality") if not meta.get(key)]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    side, modality = Side.parse(meta["side"]), Modality.parse(meta["modality"])
    view, kind = View.NONE, Kind.NONE
    if modality is Modality.MG:
        if not meta.get("view"):
            raise ValueError("MG needs a view (CC, MLO or OTHER)")
        view = View.parse(meta["view"])
        kind = Kind.parse(meta.get("kind") or Kind.STANDARD.value)
        if view is View.NONE or kind is Kind.NONE:
            raise ValueError("MG needs a view (CC, MLO or OTHER) and a kind (2D or synthesized)")
    elif meta.get("view") or meta.get("kind"):
        raise ValueError("US images have no view or kind")
    attributes = {key: meta.get(key, "") for key in SIDECAR_ATTRIBUTES}
    if not attributes["age_bin"] and meta.get("age"):
        attributes["age_bin"] = years_to_bin(meta["age"])
    return ImageRecord(
        patient_id=meta["patient_id"], side=side, modality=modality,
        path=str(path), view=view, kind=kind,
        label=Label.parse(meta["label"]) if meta.get("label") else None, group=meta.get("group", ""),
        **attributes,  # cleaned (and the age bin checked) by ImageRecord
    )


def _density(text: str) -> str:
    """BI-RADS density A-D (also 1-4, any case) or "" -> "A".."D" or ""; ValueError otherwise."""
    if not text:
        return ""
    density = DENSITIES.get(text.strip().lower())
    if density is None:
        raise ValueError(f"density {text!r} is not a BI-RADS density (A, B, C, D or 1-4)")
    return density


def _from_layout(path: Path, root: Path) -> ImageRecord | None:
    parts = path.relative_to(root).parts
    if len(parts) < 4:
        return None
    patient, side_text, modality_text = parts[-4:-1]
    try:
        side, modality = Side.parse(side_text), Modality.parse(modality_text)
    except ValueError:
        return None
    if modality is Modality.US:
        return ImageRecord(patient, side, modality, str(path))
    name = path.stem.upper()
    views = {m.group(1) for m in _MG_VIEW_IN_NAME.finditer(name)}
    if len(views) != 1:
        raise InputImageError(f"{path}: MG file name names no single view (CC or MLO)")
    kind = Kind.SYNTHESIZED if _SYNTH_IN_NAME.search(name) else Kind.STANDARD
    return ImageRecord(patient, side, modality, str(path), View.parse(views.pop()), kind)


# -- labels and pseudonyms ---------------------------------------------------------------------


@dataclass(frozen=True)
class LabelRow:
    """One line of a labels CSV; side None means every breast of the patient."""

    line: int
    patient_id: str
    side: Side | None
    label: Label
    density: str = ""  # BI-RADS A-D or ""
    age_bin: str = ""  # a 10-year bin or "", never the exact age


def read_labels(path: PathLike) -> list[LabelRow]:
    """Read a labels CSV (patient_id, side, label); raise ManifestError listing every bad line."""
    file = Path(path)
    if not file.is_file():
        raise ManifestError(f"{path}: labels file not found")
    rows: list[LabelRow] = []
    problems: list[str] = []
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text (byte {exc.start}); save the CSV as UTF-8") from None
    with io.StringIO(text, newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        missing = [c for c in ("patient_id", "side", "label") if c not in header]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {', '.join(missing)}")
        for lineno, cells in enumerate(reader, start=2):
            row = dict(zip(header, (c.strip() for c in cells), strict=False))
            if not any(row.values()):
                continue
            try:
                rows.append(_label_row(lineno, row))
            except ValueError as exc:
                problems.append(f"{file.name} line {lineno}: {exc}")
    problems += _label_conflicts(rows, file.name)
    if problems:
        raise ManifestError("\n".join([f"{path}: {len(problems)} problem(s)", *("  " + p for p in problems)]))
    return rows


def _label_row(lineno: int, row: dict[str, str]) -> LabelRow:
    patient = row.get("patient_id", "")
    if not patient:
        raise ValueError("empty patient_id")
    side = Side.parse(row["side"]) if row.get("side") else None
    label = Label.parse(row.get("label", ""))
    age = years_to_bin(row["age"]) if row.get("age") else ""
    return LabelRow(lineno, patient, side, label, _density(row.get("density", "")), age)


def _label_conflicts(rows: list[LabelRow], name: str) -> list[str]:
    first: dict[tuple[str, Side | None], LabelRow] = {}
    problems = []
    for row in rows:
        key = (row.patient_id, row.side)
        earlier = first.setdefault(key, row)
        if earlier.label is not row.label:
            problems.append(f"{name} line {row.line}: label {row.label.value} differs from line "
                            f"{earlier.line} ({earlier.label.value}) for the same breast")
        if row.density and earlier.density and row.density != earlier.density:
            problems.append(f"{name} line {row.line}: density {row.density} differs from line "
                            f"{earlier.line} ({earlier.density}) for the same breast")
        if row.age_bin and earlier.age_bin and row.age_bin != earlier.age_bin:  # bins are not quoted
            problems.append(f"{name} line {row.line}: age differs from line {earlier.line} for the same breast")
    return problems


def _apply_labels(records: list[ImageRecord], rows: list[LabelRow], labels_csv: PathLike | None,
                  salt: str | None) -> tuple[list[ImageRecord], list[str]]:
    """Labels from the CSV (by exact side, else patient-wide); lines naming no breast are problems.

    Density and age bin come from the first of those rows that gives them (a patient-wide row
    can give the age while per-breast rows give the labels)."""
    if not rows:
        return records, []
    table = {(row.patient_id, row.side): row for row in rows}
    used: set[int] = set()
    out = []
    for rec in records:
        ids = [rec.patient_id] + ([pseudonymise(rec.patient_id, salt)] if salt is not None else [])
        keys = [(pid, side) for side in (rec.side, None) for pid in ids]
        matches = [table[key] for key in keys if key in table]
        if matches:
            row = matches[0]
            used.add(row.line)
            rec = replace(rec, label=row.label)
            for column in ("density", "age_bin"):
                giver = next((m for m in matches if getattr(m, column)), None)
                if giver is not None:
                    used.add(giver.line)
                    rec = replace(rec, **{column: getattr(giver, column)})
        out.append(rec)
    name = Path(labels_csv).name if labels_csv is not None else "labels"
    problems = [f"{name} line {row.line}: no ingested image for this patient"
                + ("" if row.side is None else " and side")
                for row in rows if row.line not in used]
    return out, problems


def _pseudonymised(record: ImageRecord, salt: str | None) -> ImageRecord:
    if salt is None:
        return record
    group = pseudonymise(record.group, salt) if record.group else ""
    return replace(record, patient_id=pseudonymise(record.patient_id, salt), group=group)


# -- reasons -----------------------------------------------------------------------------------


def _reason(exc: InputImageError, path: Path) -> str:
    """The message without its leading path: the reason alone, on one line."""
    text = " ".join(str(exc).split())
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def _reason_key(reason: str) -> str:
    """The fixed part of a reason, for counting: the text before its first '(' or ':'."""
    return re.split(r" \(|: ", reason, maxsplit=1)[0]


def _counts(counter: Counter[str]) -> str:
    if not counter:
        return ""
    return " (" + ", ".join(f"{key}: {n}" for key, n in sorted(counter.items())) + ")"


def _count_lines(counter: Counter[str]) -> list[str]:
    return [f"  {key}: {n}" for key, n in sorted(counter.items())]
