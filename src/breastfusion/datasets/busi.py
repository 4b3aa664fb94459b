"""BUSI (Breast Ultrasound Images, Al-Dhabyani et al. 2020) from its official layout.

Layout: ``root/Dataset_BUSI_with_GT/{normal,benign,malignant}/NAME.png`` with lesion
masks ``NAME_mask.png`` (sometimes also ``NAME_mask_1.png``, ``NAME_mask_2.png``)
beside each image; ``root`` may also be the inner ``Dataset_BUSI_with_GT`` folder.
Masks are never records; :func:`busi_masks` finds an image's masks (Grad-CAM
localisation checks use them).

Conventions of this adapter
  * label: the class folder (image-level labels).
  * modality US, view and kind empty (ultrasound).
  * subgroup attributes: source "BUSI" only (BUSI gives no age, density or device
    per image; its paper says 25-75 years, LOGIQ E9, for the whole set).
  * side: BUSI records no laterality. Every image gets ``Side.LEFT`` **by
    convention**; it carries no information and must not be read as the real side.
  * patient: BUSI has no patient ids, so each image is its own patient
    (``BUSI-benign-101`` for ``benign (101).png``) and its own case.
  * group: the dataset is known to contain near-duplicate images (the same
    lesion captured twice, crops of one capture). Images are grouped by a
    perceptual hash (:func:`near_duplicate_groups`: 16x16 average hash of the
    grey image, Hamming distance <= 12, transitive closure by union-find) and the
    group id (``BUSI-G0001``...) goes into ``ImageRecord.group`` so that the fold
    splitter never puts two near-duplicates into two folds. Grouping is
    deliberately conservative: the transitive closure also chains some images that
    merely share a layout (bright skin layers above dark tissue) into one larger
    group, and a few groups hold images of two classes (plausibly one woman's
    lesion and normal tissue). Over-grouping costs fold balance, never leaks.

Unreadable images are skipped with a warning naming the file and the reason; the
optional ``report`` dict receives the counts.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import BreastFusionError, InputImageError
from ..records import ImageRecord
from ..vocab import Kind, Label, Modality, Side, View

log = logging.getLogger(__name__)

INNER_FOLDER = "Dataset_BUSI_with_GT"
CLASS_FOLDERS: dict[str, Label] = {"normal": Label.NORMAL, "benign": Label.BENIGN, "malignant": Label.MALIGNANT}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
BUSI_SIDE = Side.LEFT  # BUSI has no laterality: a placeholder, by convention
HASH_SIZE = 16
HASH_MAX_DISTANCE = 12
SOURCE = "BUSI"

_MASK_RE = re.compile(r"_mask(?:_\d+)?$", re.IGNORECASE)
_NUMBER_RE = re.compile(r"\((\d+)\)")


def busi_root(root: str | os.PathLike) -> Path:
    """The folder holding the class folders: ``root/Dataset_BUSI_with_GT`` or ``root`` itself."""
    root = Path(root)
    for candidate in (root / INNER_FOLDER, root):
        if any((candidate / name).is_dir() for name in CLASS_FOLDERS):
            return candidate.resolve()
    raise BreastFusionError(
        f"{root}: not a BUSI folder (expected {INNER_FOLDER}/{{normal,benign,malignant}}/ or the class folders)"
    )


def is_mask(path: str | os.PathLike) -> bool:
    return bool(_MASK_RE.search(Path(path).stem))


def busi_masks(image_path: str | os.PathLike) -> list[Path]:
    """The lesion mask files of one BUSI image (``NAME_mask.png``, ``NAME_mask_1.png``...), sorted.

    Normal images have an all-black mask; an image without a mask file gives [].
    """
    image_path = Path(image_path)
    pattern = re.compile(re.escape(image_path.stem) + r"_mask(?:_(\d+))?$", re.IGNORECASE)
    found: list[tuple[int, Path]] = []
    if not image_path.parent.is_dir():
        return []
    for entry in image_path.parent.iterdir():
        if entry.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        match = pattern.fullmatch(entry.stem)
        if match:
            found.append((int(match.group(1) or 0), entry))
    return [path for _, path in sorted(found)]


def busi_patient_id(path: str | os.PathLike, label: Label) -> str:
    """``benign (101).png`` -> ``BUSI-benign-101``; other names keep a sanitised stem."""
    stem = Path(path).stem
    match = _NUMBER_RE.search(stem)
    tail = match.group(1) if match else re.sub(r"[^A-Za-z0-9]+", "_", stem).strip("_")
    return f"BUSI-{label.value}-{tail}"


def average_hash(path: str | os.PathLike, size: int = HASH_SIZE) -> np.ndarray:
    """Average hash: the grey image box-averaged to size x size, each cell > mean. Bool, size*size.

    Colour images are converted to grey (ITU-R 601 luma); 16-bit images keep their range.
    Raises InputImageError naming the file when it cannot be read.
    """
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
                im = im.convert("L")
            arr = np.asarray(im, dtype=np.float32)
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputImageError(f"{path}: cannot read image ({exc})") from exc
    if arr.ndim != 2 or arr.size == 0:
        raise InputImageError(f"{path}: not a 2-D image (shape {arr.shape})")
    small = np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    return (small > small.mean()).ravel()


def _hash_many(paths: Sequence[str | os.PathLike], size: int) -> list[np.ndarray | InputImageError]:
    """Hash images in threads (decoding releases the GIL); an error is returned in place of its hash."""

    def one(path):
        try:
            return average_hash(path, size)
        except InputImageError as exc:
            return exc

    workers = min(8, os.cpu_count() or 1, max(1, len(paths)))
    if workers == 1:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, paths))


def hash_groups(hashes: np.ndarray, max_distance: int = HASH_MAX_DISTANCE, block: int = 2048) -> list[int]:
    """Union-find over all pairs with Hamming distance <= max_distance.

    ``hashes`` is a bool (n, bits) array. Returns a group number per row, numbered
    0, 1, ... in order of each group's first row. Distances are computed blockwise
    with two matrix products (d = a.(1-b) + (1-a).b), so n of a few thousand is fast.
    """
    bits = np.asarray(hashes, dtype=bool)
    n = len(bits)
    if n == 0:
        return []
    x = bits.reshape(n, -1).astype(np.float32)
    parent = list(range(n))

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    for start in range(0, n, block):
        a = x[start:start + block]
        dist = a @ (1.0 - x).T + (1.0 - a) @ x.T
        rows, cols = np.nonzero(dist <= max_distance + 0.5)
        rows = rows + start
        keep = cols > rows
        for i, j in zip(rows[keep].tolist(), cols[keep].tolist(), strict=True):
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    numbering: dict[int, int] = {}
    return [numbering.setdefault(find(i), len(numbering)) for i in range(n)]


def near_duplicate_groups(paths: Sequence[str | os.PathLike], size: int = HASH_SIZE,
                          max_distance: int = HASH_MAX_DISTANCE) -> list[int]:
    """Near-duplicate group number per image (0, 1, ... by first appearance in ``paths``).

    Two images are near-duplicates when their ``size`` x ``size`` average hashes
    differ in at most ``max_distance`` bits; groups are the transitive closure.
    Raises InputImageError on the first unreadable image.
    """
    hashes = _hash_many(paths, size)
    for item in hashes:
        if isinstance(item, InputImageError):
            raise item
    if not hashes:
        return []
    return hash_groups(np.stack(hashes), max_distance)


def list_busi_images(root: str | os.PathLike) -> list[tuple[Path, Label]]:
    """(image path, label) for every non-mask image, sorted by class folder then name."""
    base = busi_root(root)
    out: list[tuple[Path, Label]] = []
    for folder, label in CLASS_FOLDERS.items():
        class_dir = base / folder
        if not class_dir.is_dir():
            log.warning("BUSI: class folder %s missing", class_dir)
            continue
        for path in sorted(class_dir.iterdir(), key=lambda p: _natural_key(p.name)):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not is_mask(path):
                out.append((path, label))
    return out


def _natural_key(name: str) -> list:
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", name)]


def load_busi(root: str | os.PathLike, *, size: int = HASH_SIZE, max_distance: int = HASH_MAX_DISTANCE,
              report: dict | None = None) -> list[ImageRecord]:
    """BUSI image records (US, side L by convention, one patient per image, near-duplicate groups).

    ``report`` (optional dict) receives: images, per-class counts, skipped files with
    reasons, the number of near-duplicate groups and the largest group's size.
    """
    items = list_busi_images(root)
    hashes = _hash_many([path for path, _ in items], size)
    kept: list[tuple[Path, Label]] = []
    kept_hashes: list[np.ndarray] = []
    skipped: list[str] = []
    for (path, label), item in zip(items, hashes, strict=True):
        if isinstance(item, InputImageError):
            log.warning("BUSI: skipped %s", item)
            skipped.append(str(item))
            continue
        kept.append((path, label))
        kept_hashes.append(item)
    groups = hash_groups(np.stack(kept_hashes), max_distance) if kept_hashes else []
    records = []
    seen: set[str] = set()
    for (path, label), group in zip(kept, groups, strict=True):
        patient = busi_patient_id(path, label)
        if patient in seen:  # two files with the same number (e.g. .png and .jpg): keep both, distinctly
            patient = f"{patient}-{re.sub(r'[^A-Za-z0-9]+', '_', path.name)}"
        seen.add(patient)
        records.append(ImageRecord(
            patient_id=patient, side=BUSI_SIDE, modality=Modality.US, path=str(path),
            view=View.NONE, kind=Kind.NONE, label=label, group=f"BUSI-G{group + 1:04d}",
            source=SOURCE,
        ))
    if report is not None:
        sizes = np.bincount(groups) if groups else np.zeros(0, dtype=int)
        report.update({
            "dataset": "BUSI",
            "images": len(records),
            "classes": {lab.value: sum(r.label is lab for r in records) for lab in Label},
            "skipped": skipped,
            "near_duplicate_groups": len(sizes),
            "images_in_shared_groups": int(sizes[sizes > 1].sum()) if len(sizes) else 0,
            "largest_group": int(sizes.max()) if len(sizes) else 0,
        })
    return records
