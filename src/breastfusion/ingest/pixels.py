"""One reader for every image file breastfusion accepts, DICOM or not.

`read_pixels(path)` gives a 2D float32 array in [0, 1] where 1 is bright;
`read_rgb(path)` gives the (H, W, 3) float32 colour image of a colour file, or
None when the file is grey (ultrasound colour detection needs the colour).
The format is found from the file's content, never from its extension.

DICOM (pydicom; compressed transfer syntaxes need the decoder plugins, see
`DICOM_PLUGINS`):

1. Modality LUT, or Rescale Slope / Intercept (`apply_modality_lut`).
2. VOI: the first VOI LUT when there is one (pydicom's preference), else the
   first Window Center / Width (LINEAR, LINEAR_EXACT or SIGMOID), each scaled
   over its own output range to [0, 1]. With neither, or with a window that
   is not valid, min-max of the data.
3. MONOCHROME1 is inverted, so 1 is bright for every file.

Colour DICOM (RGB; YBR_* converted to RGB by pydicom; PALETTE COLOR through
its palette) is scaled by its bit depth. Multi-frame objects (tomosynthesis
volumes, cine loops) are refused.

Image files (Pillow): 8-bit grey and colour are divided by 255. PGM/PPM are
scaled by the maxval in their header (Pillow widens them to 8 or 16 bits).
Other 16-bit files (PNG, TIFF) are divided by 2**b - 1, with b the smallest of
8, 10, 12, 14, 16 bits that holds the image's maximum, so that a 12-bit
mammogram saved in a 16-bit PNG keeps its contrast (PNG's sBIT chunk is not
readable through Pillow). Palette, alpha and CMYK images become RGB (alpha is
dropped). Multi-frame image files are refused.

Grey or colour: an RGB image whose channels differ by at most
`GREY_TOLERANCE` (a fraction of full scale) at every pixel is grey (grey
screen captures, grey JPEGs saved as RGB). `read_pixels` turns a colour image
into grey with ITU-R BT.601 luma weights.

Limits: an image over `MAX_SIDE` pixels on a side or `MAX_PIXELS` in all is
refused before it is decoded (decompression bombs).

Errors: every failure is an `InputImageError` with one line, the path first
and then the reason; no other exception escapes for a bad file. pydicom's
warnings and log lines are silenced while reading, because they may quote
tag values (a birth date that fails validation, for instance).
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing, get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ..errors import InputImageError

MAX_SIDE = 20_000
MAX_PIXELS = 100_000_000  # the largest mammography detectors give about 30 MPixel
GREY_TOLERANCE = 0.03  # channel spread, as a fraction of full scale, still counted as grey
DICOM_PLUGINS = "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

FileKind = Literal["dicom", "image"]
PathLike = str | os.PathLike

_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*")
_PNM_MAGIC = re.compile(rb"P[1-6]\s")


# -- public API --------------------------------------------------------------------------------


def read_pixels(path: PathLike) -> np.ndarray:
    """Read a DICOM or image file as a 2D float32 array in [0, 1] (1 = bright)."""
    image = read_image(path)
    return image if image.ndim == 2 else to_grey(image)


def read_rgb(path: PathLike) -> np.ndarray | None:
    """Read a colour file as (H, W, 3) float32 in [0, 1]; None when the file is grey."""
    image = read_image(path)
    return image if image.ndim == 3 else None


def read_image(path: PathLike) -> np.ndarray:
    """Read a file as grey (H, W) or, only when it has colour, (H, W, 3) float32 in [0, 1]."""
    with input_errors(path):
        if sniff(path) == "dicom":
            return dataset_image(load_dicom(path), path)
        return _read_image_file(path)


def sniff(path: PathLike) -> FileKind:
    """Tell a DICOM file from an image file by content; raise InputImageError for anything else."""
    file = Path(path)
    if not file.exists():
        raise InputImageError(f"{path}: file not found")
    if not file.is_file():
        raise InputImageError(f"{path}: not a regular file")
    if file.stat().st_size == 0:
        raise InputImageError(f"{path}: zero-byte file")
    with open(file, "rb") as fh:
        head = fh.read(132)
    if head[128:132] == b"DICM" or _looks_like_raw_dicom(head):
        return "dicom"
    if head.startswith(_IMAGE_MAGIC) or _PNM_MAGIC.match(head) or _pillow_identifies(file):
        return "image"
    raise InputImageError(f"{path}: not an image or DICOM file")


def load_dicom(path: PathLike) -> Dataset:
    """Read a DICOM file (with or without preamble and file meta) with its pixel data."""
    with quiet_pydicom():
        try:
            ds = pydicom.dcmread(path, force=True)
            _ensure_transfer_syntax(ds)
        except Exception as exc:  # noqa: BLE001 - any parser failure means a bad file
            raise InputImageError(f"{path}: not a readable DICOM file ({_describe(exc)})") from exc
    return ds


def dataset_image(ds: Dataset, path: PathLike) -> np.ndarray:
    """The image of a single-frame DICOM dataset: grey (H, W) or colour (H, W, 3), float32 in [0, 1]."""
    with input_errors(path), quiet_pydicom():  # tag values are converted lazily, on first access
        _check_single_frame_with_pixels(ds, path)
        _check_size(path, _int(ds, "Columns"), _int(ds, "Rows"))
        _check_decoder(ds, path)
        try:
            arr = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - decoders raise many types for bad data
            raise InputImageError(f"{path}: cannot decode pixel data ({_describe(exc)})") from exc
        photometric = str(ds.get("PhotometricInterpretation", "")).upper()
        if arr.ndim == 3 and arr.shape[-1] == 3:
            return _colour_or_grey(arr, 2 ** _int(ds, "BitsStored", 8) - 1)
        if arr.ndim != 2:
            raise InputImageError(f"{path}: pixel data of shape {arr.shape} is not one 2D image")
        if photometric == "PALETTE COLOR":
            rgb = apply_color_lut(arr, ds)
            return _colour_or_grey(rgb, np.iinfo(rgb.dtype).max)
        return _dicom_grey(arr, ds, invert=photometric == "MONOCHROME1")


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) float image -> (H, W) float32 by ITU-R BT.601 luma."""
    return np.clip(rgb.astype(np.float32) @ LUMA, 0.0, 1.0)


def is_grey_content(rgb: np.ndarray, full_scale: float) -> bool:
    """True when the three channels agree within GREY_TOLERANCE at every pixel."""
    spread = np.ptp(rgb, axis=-1)
    return bool(spread.size == 0 or float(spread.max()) <= GREY_TOLERANCE * full_scale)


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log lines, which may quote tag values.

    `disabled` alone does not reach child loggers (pydicom 3's decoders log through
    ``pydicom.pixels.decoders.base``); a level above CRITICAL does, by inheritance."""
    logger = logging.getLogger("pydicom")
    was_disabled, was_level = logger.disabled, logger.level
    logger.disabled = True
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = was_disabled
        logger.setLevel(was_level)


@contextmanager
def input_errors(path: PathLike) -> Iterator[None]:
    """Turn any exception raised while reading `path` into a one-line InputImageError."""
    try:
        yield
    except InputImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bad file must end as InputImageError, whatever failed
        raise InputImageError(f"{path}: cannot read ({_describe(exc)})") from exc


# -- image files -------------------------------------------------------------------------------


def _pillow_identifies(file: Path) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(file):
                return True
        except Image.DecompressionBombError:
            return True
        except Exception:  # noqa: BLE001 - anything Pillow cannot open is not an image here
            return False


def _read_image_file(path: PathLike) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                _check_size(path, *img.size)
                if getattr(img, "n_frames", 1) > 1:
                    raise InputImageError(f"{path}: multi-frame image file ({img.n_frames} frames)")
                img.load()
                return _pillow_array(img)
        except Image.DecompressionBombError as exc:
            raise InputImageError(f"{path}: image too large ({_describe(exc)})") from exc
        except UnidentifiedImageError as exc:
            raise InputImageError(f"{path}: not an image file Pillow can read") from exc
        except OSError as exc:
            raise InputImageError(f"{path}: truncated or corrupt image file ({_describe(exc)})") from exc


def _pillow_array(img: Image.Image) -> np.ndarray:
    if img.mode.startswith("I"):
        arr = np.asarray(img).astype(np.float64)
        if img.format == "PPM":  # Pillow already scaled by the header's maxval
            return _scaled(arr, 0.0, 65535.0 if arr.max() > 255 else 255.0)
        return _scale_integers(arr)
    if img.mode == "F":
        return _min_max(np.asarray(img, dtype=np.float64))
    if img.mode in ("1", "L", "LA"):
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    return _colour_or_grey(np.asarray(img.convert("RGB")), 255)


def _scale_integers(arr: np.ndarray) -> np.ndarray:
    """Divide by 2**b - 1 for the smallest b in 8..16 (even) that holds the maximum."""
    if arr.size == 0 or float(arr.min()) < 0 or float(arr.max()) > 65535:
        return _min_max(arr)
    top = float(arr.max())
    bits = next(b for b in (8, 10, 12, 14, 16) if top <= 2**b - 1)
    return _scaled(arr, 0.0, 2.0**bits - 1)


# -- DICOM -------------------------------------------------------------------------------------


def _looks_like_raw_dicom(head: bytes) -> bool:
    """A DICOM data set without preamble starts with a group 0002 or 0008 element (either byte order)."""
    if len(head) < 8:
        return False
    for order in ("little", "big"):
        group = int.from_bytes(head[0:2], order)
        element = int.from_bytes(head[2:4], order)
        if group in (0x0002, 0x0008) and element < 0x0100:
            return True
    return False


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Give a file without file meta the transfer syntax that pydicom read it with."""
    if ds.file_meta.get("TransferSyntaxUID"):
        return
    implicit, little = ds.original_encoding
    if implicit or implicit is None:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _check_single_frame_with_pixels(ds: Dataset, path: PathLike) -> None:
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        sop = ds.get("SOPClassUID")
        what = f" ({UID(str(sop)).name})" if sop else ""
        raise InputImageError(f"{path}: DICOM without pixel data{what}")
    frames = _int(ds, "NumberOfFrames", 1)
    if frames > 1:
        raise InputImageError(
            f"{path}: multi-frame object ({frames} frames): DBT volumes and cine loops are not used"
        )


def _check_decoder(ds: Dataset, path: PathLike) -> None:
    uid = UID(str(ds.file_meta.TransferSyntaxUID))
    if not uid.is_transfer_syntax:
        raise InputImageError(f"{path}: unknown transfer syntax {uid}")
    if not uid.is_compressed:
        return
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise InputImageError(f"{path}: unsupported transfer syntax {uid.name} ({uid})") from None
    if not decoder.is_available:
        raise InputImageError(
            f"{path}: cannot decode transfer syntax {uid.name} ({uid}): install {DICOM_PLUGINS}"
        )


def _dicom_grey(arr: np.ndarray, ds: Dataset, *, invert: bool) -> np.ndarray:
    with np.errstate(all="ignore"):
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        out = _apply_voi(values, ds)
    return (1.0 - out) if invert else out


def _apply_voi(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """VOI LUT, else windowing, else min-max; always scaled to [0, 1] float32."""
    lut = ds.get("VOILUTSequence")
    if lut and lut[0].get("LUTDescriptor") and lut[0].get("LUTData") is not None:
        first, count = int(lut[0].LUTDescriptor[1]), int(lut[0].LUTDescriptor[0]) or 65536
        table = apply_voi(np.arange(first, first + count, dtype=np.float64), ds)
        return _scaled(apply_voi(values, ds), float(table.min()), float(table.max()))
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        try:
            low, high = apply_windowing(np.array([-1e300, 1e300]), ds)
            return _scaled(apply_windowing(values, ds), float(low), float(high))
        except (ValueError, TypeError, IndexError):  # a window that is not valid: documented fallback
            pass
    return _min_max(values)


def _int(ds: Dataset, keyword: str, default: int = 0) -> int:
    try:
        return int(ds.get(keyword) or default)
    except (TypeError, ValueError):
        return default


# -- shared helpers ----------------------------------------------------------------------------


def _check_size(path: PathLike, width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise InputImageError(f"{path}: empty image ({width} x {height} pixels)")
    if max(width, height) > MAX_SIDE or width * height > MAX_PIXELS:
        raise InputImageError(
            f"{path}: image too large ({width} x {height} pixels; limits {MAX_SIDE} per side, "
            f"{MAX_PIXELS // 1_000_000} MPixel in all)"
        )


def _colour_or_grey(rgb: np.ndarray, full_scale: float) -> np.ndarray:
    grey = is_grey_content(rgb, full_scale)
    out = np.clip(rgb.astype(np.float32) / np.float32(full_scale), 0.0, 1.0)
    return to_grey(out) if grey else out


def _scaled(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if not high > low:
        return _min_max(values)
    out = (np.nan_to_num(values, nan=low) - low) / (high - low)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _min_max(values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.max() == finite.min():
        return np.zeros(values.shape, dtype=np.float32)
    low, high = float(finite.min()), float(finite.max())
    out = (np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low) / (high - low)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__
