"""mini-MIAS (Suckling et al. 1994) digitised film mammograms, from the official layout.

Layout: ``root/all-mias/mdbNNN.{pgm,png}`` and ``Info.txt`` (in ``all-mias/`` as in the
official archive, or in ``root``); ``root`` may also be the ``all-mias`` folder itself.

Info.txt: free-text header, then one row per abnormality:
``mdbNNN TISSUE CLASS [SEVERITY [X Y RADIUS]]`` (CLASS in CALC CIRC SPIC MISC ARCH ASYM
NORM; SEVERITY B or M; X, Y with the origin at the BOTTOM-left; some rows have no
coordinates, e.g. ``*NOTE 3*`` for widely distributed calcifications). An image with
several abnormalities has several rows.

Conventions of this adapter
  * label: NORM -> normal, B -> benign, M -> malignant; an image with several rows
    takes the most severe (M > B > normal). An abnormality row without a severity
    leaves the image unlabeled (skipped with a warning).
  * view MLO (mini-MIAS is MLO only), kind 2D, modality MG.
  * side: odd number = right, even = left; consecutive pairs (001/002, 003/004...)
    are the two breasts of one woman: patient id and group ``MIAS-W<k>`` with
    k = (number + 1) // 2, so the two breasts are two cases of one patient and
    always fall in one fold.
  * images listed in Info.txt but absent (the held-back portion) are ignored;
    image files without an Info.txt row are skipped with a warning.
  * subgroup attributes: source "mini-MIAS"; density from the background tissue
    column (F, G, D -> "fatty", "fatty-glandular", "dense-glandular"). These are
    MIAS's own tissue classes, NOT BI-RADS densities A-D; they are kept as words so
    that no table mixes them up. mini-MIAS gives no age and no device.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BreastFusionError
from ..records import ImageRecord
from ..vocab import Kind, Label, Modality, Side, View

log = logging.getLogger(__name__)

IMAGE_FOLDER = "all-mias"
INFO_FILE = "Info.txt"
IMAGE_SUFFIXES = (".pgm", ".png")  # official first: when both exist the .pgm is used
IMAGE_SIZE = 1024
ABNORMALITY_CLASSES = ("CALC", "CIRC", "SPIC", "MISC", "ARCH", "ASYM", "NORM")

_REF_RE = re.compile(r"^mdb(\d{3,})$", re.IGNORECASE)
_SEVERITY = {"B": Label.BENIGN, "M": Label.MALIGNANT}
SOURCE = "mini-MIAS"
# MIAS background tissue classes -> manifest density values. Not BI-RADS (A-D): MIAS's own
# three film-era classes, kept as words so they are never read as a BI-RADS density.
TISSUE_DENSITY = {"F": "fatty", "G": "fatty-glandular", "D": "dense-glandular"}


@dataclass
class MiasEntry:
    """All Info.txt rows of one image."""

    number: int
    tissue: str = ""
    classes: list[str] = field(default_factory=list)
    severities: list[Label] = field(default_factory=list)
    lesions: list[tuple[int, int, int]] = field(default_factory=list)  # (x, y from bottom, radius)
    unlabeled_rows: int = 0

    @property
    def label(self) -> Label | None:
        if self.unlabeled_rows and not self.severities:
            return None
        if self.severities:
            return max(self.severities, key=lambda lab: lab.index)
        return Label.NORMAL if "NORM" in self.classes else None


def parse_info(text: str) -> tuple[dict[int, MiasEntry], list[str]]:
    """Parse Info.txt: (image number -> entry, unparseable data lines). Header lines are ignored."""
    entries: dict[int, MiasEntry] = {}
    problems: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        ref = _REF_RE.match(tokens[0])
        if not ref:
            continue  # header / notes
        number = int(ref.group(1))
        entry = entries.setdefault(number, MiasEntry(number))
        rest = tokens[1:]
        if rest and rest[0].upper() in ("F", "G", "D"):
            entry.tissue = rest[0].upper()
            rest = rest[1:]
        if not rest or rest[0].upper() not in ABNORMALITY_CLASSES:
            problems.append(f"line {lineno}: no abnormality class: {line.strip()!r}")
            entry.unlabeled_rows += 1
            continue
        cls = rest[0].upper()
        entry.classes.append(cls)
        rest = rest[1:]
        if cls == "NORM":
            continue
        if not rest or rest[0].upper() not in _SEVERITY:
            problems.append(f"line {lineno}: {cls} without severity B/M: {line.strip()!r}")
            entry.unlabeled_rows += 1
            continue
        entry.severities.append(_SEVERITY[rest[0].upper()])
        numbers = []
        for tok in rest[1:4]:
            if not re.fullmatch(r"\d+(\.\d+)?", tok):
                break
            numbers.append(int(round(float(tok))))
        if len(numbers) == 3:
            entry.lesions.append((numbers[0], numbers[1], numbers[2]))
        # else: no (or incomplete) coordinates, e.g. '*NOTE 3*': labelled, not localised
    return entries, problems


def locate(root: str | os.PathLike) -> tuple[Path, Path]:
    """(image folder, Info.txt) of a mini-MIAS copy rooted at ``root``."""
    root = Path(root)
    for images in (root / IMAGE_FOLDER, root):
        if images.is_dir() and any(_REF_RE.match(p.stem) for p in images.iterdir()
                                   if p.suffix.lower() in IMAGE_SUFFIXES):
            for info in (images / INFO_FILE, images.parent / INFO_FILE):
                if info.is_file():
                    return images.resolve(), info.resolve()
            raise BreastFusionError(f"{images}: mini-MIAS images found but no {INFO_FILE}")
    raise BreastFusionError(f"{root}: not a mini-MIAS folder (expected {IMAGE_FOLDER}/mdbNNN.pgm|png and {INFO_FILE})")


def _image_files(image_dir: Path) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for suffix in IMAGE_SUFFIXES:
        for path in sorted(image_dir.iterdir()):
            match = _REF_RE.match(path.stem)
            if match and path.suffix.lower() == suffix and path.is_file():
                found.setdefault(int(match.group(1)), path)
    return found


def mias_side(number: int) -> Side:
    return Side.RIGHT if number % 2 else Side.LEFT


def mias_woman(number: int) -> str:
    return f"MIAS-W{(number + 1) // 2:03d}"


def load_mias(root: str | os.PathLike, *, report: dict | None = None) -> list[ImageRecord]:
    """mini-MIAS records (MG, MLO, 2D; patient = woman, two cases L/R; labels from Info.txt)."""
    image_dir, info_path = locate(root)
    entries, problems = parse_info(info_path.read_text(encoding="latin-1"))
    for line in problems:
        log.warning("mini-MIAS %s: %s", info_path.name, line)
    files = _image_files(image_dir)
    records = []
    not_listed: list[str] = []
    unlabeled: list[str] = []
    for number, path in sorted(files.items()):
        entry = entries.get(number)
        if entry is None:
            not_listed.append(path.name)
            continue
        if entry.label is None:
            unlabeled.append(path.name)
            continue
        woman = mias_woman(number)
        records.append(ImageRecord(
            patient_id=woman, side=mias_side(number), modality=Modality.MG, path=str(path),
            view=View.MLO, kind=Kind.STANDARD, label=entry.label, group=woman,
            source=SOURCE, density=TISSUE_DENSITY.get(entry.tissue, ""),
        ))
    for name in not_listed:
        log.warning("mini-MIAS: skipped %s: not in %s", name, INFO_FILE)
    for name in unlabeled:
        log.warning("mini-MIAS: skipped %s: abnormality without severity", name)
    if report is not None:
        multi = sorted(f"mdb{n:03d}" for n, e in entries.items()
                       if n in files and len(e.severities) > 1)
        mixed = sorted(f"mdb{n:03d}" for n, e in entries.items() if n in files and len(set(e.severities)) > 1)
        report.update({
            "dataset": "mini-MIAS",
            "images": len(records),
            "women": len({r.patient_id for r in records}),
            "classes": {lab.value: sum(r.label is lab for r in records) for lab in Label},
            "listed_in_info": len(entries),
            "listed_but_absent": len(set(entries) - set(files)),
            "images_with_several_abnormalities": multi,
            "images_with_benign_and_malignant": mixed,
            "not_listed": not_listed,
            "unlabeled": unlabeled,
            "info_problems": problems,
        })
    return records


def mias_lesions(root: str | os.PathLike, height: int = IMAGE_SIZE) -> dict[str, list[tuple[int, int, int]]]:
    """str(image path) -> [(x, y from the top, radius)] for every present, listed image.

    Info.txt's y has its origin at the bottom-left; the row coordinate is
    ``height - y`` (all mini-MIAS images are 1024 x 1024). Normal images and
    abnormalities without coordinates give an empty list. Paths match load_mias's.
    """
    image_dir, info_path = locate(root)
    entries, _ = parse_info(info_path.read_text(encoding="latin-1"))
    out: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for number, path in sorted(_image_files(image_dir).items()):
        entry = entries.get(number)
        if entry is None:
            continue
        out[str(path)] = [(x, height - y, r) for x, y, r in entry.lesions]
    return dict(out)
