"""The whole preprocessing of one image file, and a disk cache of its results.

`Preprocessor.process(path, modality, side)`:

- MG: read grey -> `crop_breast` (largest foreground component, labels
  masked) -> `orient_info` (chest wall to `chest_wall`, laterality checked
  against content) -> pad to square (aspect kept) -> resize.
- US: read; a colour file goes through the colour policy (reject or grey,
  `ultrasound.apply_colour_policy`) -> `crop_scan_area` -> pad -> resize.

`enabled=False` switches the crops off (images already clean); orientation
still applies unless `chest_wall` is ``"none"``. The result is a
(size, size) float32 array in [0, 1].

`PreprocessCache(cache_dir, preprocessor).get(path, modality, side)` keeps
each result once on disk as
``<cache_dir>/preprocessed/<params hash>/<content sha256>_<modality>[_<side>].npy``:
the folder is named by a hash of `Preprocessor.key()` (every parameter and a
format number), the file by the SHA-256 of the source file's bytes (a moved
or renamed file is not reprocessed, a changed one is) plus the modality and,
for MG, the side it was processed as (they change the result: crop kind,
flip; "x" for an unknown side). Beside each image, ``<same name>.notes.json``
keeps what preprocessing flagged for it (`CropInfo.notes`: the whole image kept
because no breast or scan area was found, a colour image greyed, ...), written
before the image, so that a cached result never loses its notes; `notes()` reads
them (an entry from before notes were kept is processed again once). Writes
are atomic (temporary file + os.replace). Content hashes are memoised per
(path, mtime, size) within the process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..choices import ChestWall, ColourPolicy
from ..errors import InputImageError
from ..files import save_npy, sha256_file, write_text
from ..ingest import pixels
from ..vocab import Modality, Side
from .images import pad_to_square, read_grey, resize
from .mammo import CropInfo, MammoCrop, crop_breast_mask, orient_info
from .overlays import OverlayParams, remove_overlays
from .ultrasound import UltrasoundCrop, apply_colour_policy, crop_scan_area

FORMAT = 1  # bump when the processing changes in a way the parameters do not show


def read_rgb(path: str | os.PathLike) -> np.ndarray | None:
    """(H, W, 3) float32 in [0, 1] of a colour file (DICOM or image), None for a grey one
    (`breastfusion.ingest.pixels.read_rgb`)."""
    return pixels.read_rgb(path)


@dataclass(frozen=True)
class Preprocessor:
    """All preprocessing parameters (each one part of the cache key).

    size: side of the square output in pixels.
    enabled: crop (breast / scan area); False for images that are already clean.
    chest_wall: side of the output where a mammogram's chest wall goes ("left",
        "right"), or "none" for no flipping.
    colour: what to do with a coloured ultrasound image: "reject" (InputImageError,
        as the paper excluded Doppler images) or "grey" (luminance, flagged).
    mammo: breast crop and orientation parameters (`MammoCrop`).
    ultrasound: scan-area crop and colour thresholds (`UltrasoundCrop`).
    us_overlays: mask and inpaint the marks drawn on ultrasound images (calipers, text; see
        overlays.py); off by default, and then not part of the cache key.
    overlay: the overlay mask's parameters (`OverlayParams`).
    """

    size: int = 224
    enabled: bool = True
    chest_wall: ChestWall = ChestWall.LEFT
    colour: ColourPolicy = ColourPolicy.REJECT
    mammo: MammoCrop = field(default_factory=MammoCrop)
    ultrasound: UltrasoundCrop = field(default_factory=UltrasoundCrop)
    us_overlays: bool = False
    overlay: OverlayParams = field(default_factory=OverlayParams)

    def __post_init__(self):
        object.__setattr__(self, "chest_wall", ChestWall.parse(self.chest_wall, "chest_wall"))  # frozen
        object.__setattr__(self, "colour", ColourPolicy.parse(self.colour, "colour"))
        if int(self.size) < 1:
            raise ValueError(f"size must be positive, not {self.size}")

    def key(self) -> dict:
        """Every parameter, as plain JSON values, plus the format number (for cache keys)."""
        key = {**asdict(self), "format": FORMAT}
        if not self.us_overlays:  # (keys of caches made before the option existed stay as they were)
            del key["us_overlays"], key["overlay"]
        return key

    def key_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:16]

    def process(self, path: str | os.PathLike, modality: Modality | str, side: Side | str | None) -> np.ndarray:
        """File -> (size, size) float32 in [0, 1]."""
        return self.process_info(path, modality, side)[0]

    def process_info(self, path: str | os.PathLike, modality: Modality | str,
                     side: Side | str | None) -> tuple[np.ndarray, CropInfo]:
        """`process`, plus what the crop and orientation did."""
        cropped, info = self.crop(path, modality, side)
        out = np.clip(resize(pad_to_square(cropped), self.size), 0.0, 1.0).astype(np.float32, copy=False)
        return out, info

    def crop(self, path: str | os.PathLike, modality: Modality | str,
             side: Side | str | None) -> tuple[np.ndarray, CropInfo]:
        """File -> cropped and oriented grey image (not yet padded or resized) and its info."""
        modality = Modality.parse(modality)
        if modality is Modality.US:
            return self._ultrasound(path)
        return self._mammogram(path, side)

    def _mammogram(self, path, side) -> tuple[np.ndarray, CropInfo]:
        img = pixels.read_image(str(path))
        colour = img.ndim == 3  # a colour mammogram (rare: a screenshot, an annotated export) is greyed, flagged
        img = pixels.to_grey(img) if colour else img
        shape = (int(img.shape[0]), int(img.shape[1]))
        mask = None
        if self.enabled:
            img, info, mask = crop_breast_mask(img, self.mammo)
        else:
            info = CropInfo(shape, (0, 0, *shape))
        if self.chest_wall != ChestWall.NONE:
            img, info = orient_info(img, side, self.chest_wall, info, self.mammo, mask)
        return img, (info.flagged("colour_greyed") if colour else info)

    def _ultrasound(self, path) -> tuple[np.ndarray, CropInfo]:
        rgb = read_rgb(path)
        flags: tuple[str, ...] = ()
        fraction = None
        if rgb is not None:
            grey, fraction, acted = apply_colour_policy(rgb, self.colour, path, self.ultrasound)
            flags = ("colour_greyed",) if acted else ()
        else:
            grey = read_grey(str(path))
        if self.enabled:
            img, info = crop_scan_area(grey, None, self.ultrasound)
        else:
            img, info = grey, CropInfo((int(grey.shape[0]), int(grey.shape[1])), (0, 0, *grey.shape))
        if self.us_overlays:
            img, share = remove_overlays(img, self.overlay)
            flags = (*flags, "overlays_removed") if share > 0 else flags
        return img, info.flagged(*flags, colour_fraction=fraction)


class PreprocessCache:
    """Preprocessed images on disk, computed once per (file content, modality, side, parameters)."""

    def __init__(self, cache_dir: str | os.PathLike, preprocessor: Preprocessor | None = None):
        self.preprocessor = preprocessor if preprocessor is not None else Preprocessor()
        self.dir = Path(cache_dir) / "preprocessed" / self.preprocessor.key_hash()
        self.computed = 0  # images processed by this cache object
        self.reused = 0  # images read back from disk
        self._hashes: dict[str, tuple[int, int, str]] = {}
        self._key_written = False
        self._use_marked = False  # key.json touched for this object's first cache hit

    def content_hash(self, path: str | os.PathLike) -> str:
        """SHA-256 of the file's bytes, memoised per (path, mtime, size)."""
        key = os.path.abspath(path)
        try:
            st = os.stat(key)
        except FileNotFoundError:
            raise InputImageError(f"{path}: file not found") from None
        except OSError as exc:
            raise InputImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
        known = self._hashes.get(key)
        if known is not None and known[:2] == (st.st_mtime_ns, st.st_size):
            return known[2]
        digest = sha256_file(key)
        self._hashes[key] = (st.st_mtime_ns, st.st_size, digest)
        return digest

    def file_for(self, path: str | os.PathLike, modality: Modality | str, side: Side | str | None) -> Path:
        modality = Modality.parse(modality)
        if modality is Modality.US:  # the side does not change an ultrasound result
            return self.dir / f"{self.content_hash(path)}_{modality.value}.npy"
        side_text = Side.parse(side).value if side not in (None, "") else "x"
        return self.dir / f"{self.content_hash(path)}_{modality.value}_{side_text}.npy"

    def get(self, path: str | os.PathLike, modality: Modality | str, side: Side | str | None) -> np.ndarray:
        """The preprocessed image: read from the cache, or computed and stored once."""
        file = self.file_for(path, modality, side)
        arr = self._read(file)
        if arr is not None:
            self.reused += 1
            self._mark_used()
            return arr
        arr, info = self.preprocessor.process_info(path, modality, side)
        self._store(file, arr, info.notes())
        self.computed += 1
        return arr

    def notes(self, path: str | os.PathLike, modality: Modality | str, side: Side | str | None) -> tuple[str, ...]:
        """What preprocessing flagged for this image (`CropInfo.notes`; empty for most images).
        InputImageError when the image is refused."""
        file = self.file_for(path, modality, side)
        try:
            notes = json.loads(self._notes_file(file).read_text(encoding="utf-8"))["notes"]
            if isinstance(notes, list) and all(isinstance(n, str) for n in notes):
                return tuple(notes)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an entry from before notes were kept, or a damaged one: processed again
        arr, info = self.preprocessor.process_info(path, modality, side)
        self._store(file, arr, info.notes())
        return info.notes()

    @staticmethod
    def _notes_file(file: Path) -> Path:
        return file.with_name(file.stem + ".notes.json")

    def _read(self, file: Path) -> np.ndarray | None:
        """A cached image, or None when it is missing or damaged (then it is recomputed).

        Files this cache wrote start with one known .npy header (float32, size x size), so the
        pixels are read straight into a new array; any other header goes through np.load."""
        size = self.preprocessor.size
        try:
            with open(file, "rb") as fh:
                if fh.read(len(self._header)) == self._header:
                    arr = np.empty((size, size), np.float32)
                    if fh.readinto(memoryview(arr).cast("B")) == arr.nbytes and not fh.read(1):
                        return arr
                    return None
                fh.seek(0)
                arr = np.load(fh)
        except (OSError, ValueError):  # missing, or damaged: computed again
            return None
        return arr if arr.shape == (size, size) and arr.dtype == np.float32 else None

    @functools.cached_property
    def _header(self) -> bytes:
        """The .npy header `save_npy` writes for one preprocessed image."""
        size = self.preprocessor.size
        buf = io.BytesIO()
        np.save(buf, np.zeros((size, size), np.float32))
        return buf.getvalue()[:-size * size * 4]

    def ensure(self, path: str | os.PathLike, modality: Modality | str, side: Side | str | None) -> None:
        """Make sure the image is in the cache (computed once; InputImageError when refused)
        without reading a result that is there already (`get` checks it when it is used)."""
        if not self.file_for(path, modality, side).is_file():
            self.get(path, modality, side)

    def _mark_used(self) -> None:
        """Once per cache object, the entry's key.json touched: its time says when the entry was
        last used (`breastfusion cache list`), not only when it was last added to. A read-only
        cache is read all the same."""
        if not self._use_marked:
            self._use_marked = True
            with contextlib.suppress(OSError):
                os.utime(self.dir / "key.json")

    def _store(self, file: Path, arr: np.ndarray, notes: tuple[str, ...]) -> None:
        if not self._key_written:
            write_text(self.dir / "key.json", json.dumps(self.preprocessor.key(), indent=1))
            self._key_written = True
        write_text(self._notes_file(file), json.dumps({"notes": list(notes)}))  # first: an image implies its notes
        save_npy(file, arr)


class ImageSource:
    """The preprocessed images a model reads: one `PreprocessCache` per modality, each at its
    own output size (mammograms often larger than ultrasound). Modalities of the same size
    share one cache object. `get`, `ensure` and `file_for` dispatch on the record's modality."""

    def __init__(self, caches: dict[Modality, PreprocessCache]):
        if not caches:
            raise ValueError("an image source needs at least one modality")
        self.caches = {Modality(m): c for m, c in caches.items()}

    @classmethod
    def sized(cls, cache_dir: str | os.PathLike, base: Preprocessor, sizes: dict[Modality, int]) -> ImageSource:
        """Caches of `base`'s parameters at each modality's size (shared between equal sizes)."""
        by_size: dict[int, PreprocessCache] = {}
        for size in sizes.values():
            if size not in by_size:
                by_size[size] = PreprocessCache(cache_dir, dataclasses.replace(base, size=int(size)))
        return cls({m: by_size[s] for m, s in sizes.items()})

    def cache(self, modality: Modality | str) -> PreprocessCache:
        modality = Modality.parse(modality)
        if modality not in self.caches:
            raise ValueError(f"this model reads no {modality.value} images")
        return self.caches[modality]

    def preprocessor(self, modality: Modality | str) -> Preprocessor:
        return self.cache(modality).preprocessor

    def size(self, modality: Modality | str) -> int:
        return self.cache(modality).preprocessor.size

    def get(self, path: str | os.PathLike, modality: Modality | str, side: Side | str | None) -> np.ndarray:
        return self.cache(modality).get(path, modality, side)

    def ensure(self, path: str | os.PathLike, modality: Modality | str, side: Side | str | None) -> None:
        self.cache(modality).ensure(path, modality, side)

    def file_for(self, path: str | os.PathLike, modality: Modality | str, side: Side | str | None) -> Path:
        return self.cache(modality).file_for(path, modality, side)

    def notes(self, path: str | os.PathLike, modality: Modality | str, side: Side | str | None) -> tuple[str, ...]:
        return self.cache(modality).notes(path, modality, side)
