"""Fuzzing the input readers with hypothesis: pixel files (image and DICOM), DICOM headers and manifests.

The one property everywhere: a bad input ends as the project's own error (`BreastFusionError` and its
subclasses) or as a valid result; no other exception type escapes. Valid results are checked too: a 2D
finite float32 image in [0, 1], a DicomInfo whose refusal path is `reject_reason`, a Manifest of valid
records. Budgets are small and the runs are derandomized (and the written files deterministic) so that
CI sees the same examples every time.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, example, given, note, reject, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    JPEG2000,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from breastfusion.errors import BreastFusionError, ManifestError
from breastfusion.ingest.dicom import DicomInfo, describe
from breastfusion.ingest.pixels import load_dicom, quiet_pydicom, read_pixels, read_rgb
from breastfusion.preprocess import pipeline
from breastfusion.records import COLUMNS, ImageRecord, Manifest, read_manifest, write_manifest
from breastfusion.vocab import Kind, Label, Modality, Side, View

from dicom_files import MG_SOP, US_SOP, write_dicom

# Pillow warns (UserWarning, no tag values) about corrupt TIFF/EXIF data in damaged image files; read_pixels
# lets those through for image files, which is allowed: only exceptions and pydicom output are checked here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")

UID = "1.2.826.0.1.3680043.8.498.1"


def fuzz(examples: int) -> settings:
    """Reproducible, database-free hypothesis settings with `examples` examples."""
    return settings(
        max_examples=examples, deadline=None, database=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- properties --------------------------------------------------------------------------------


def assert_pixels_or_refused(path: Path) -> None:
    """read_pixels gives a finite non-empty 2D float32 image in [0, 1], or raises a BreastFusionError."""
    try:
        out = read_pixels(path)
    except BreastFusionError as exc:
        assert str(exc).startswith(str(path)), "the message names the file first"
        return
    assert isinstance(out, np.ndarray)
    assert out.ndim == 2 and out.size > 0, out.shape
    assert out.dtype == np.float32, out.dtype
    assert np.isfinite(out).all()
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def assert_rgb_or_refused(path: Path, reader=read_rgb) -> None:
    """read_rgb gives None or a finite (H, W, 3) float32 image in [0, 1], or raises a BreastFusionError."""
    try:
        out = reader(path)
    except BreastFusionError:
        return
    if out is None:
        return
    assert out.ndim == 3 and out.shape[-1] == 3 and out.size > 0, out.shape
    assert out.dtype == np.float32, out.dtype
    assert np.isfinite(out).all()
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def assert_readers(path: Path) -> None:
    assert_pixels_or_refused(path)
    assert_rgb_or_refused(path)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def no_pydicom_output() -> Iterator[None]:
    """pydicom's warnings and log lines (they may quote tag values) do not get out of the readers."""
    handler, logger = _Records(), logging.getLogger("pydicom")
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False  # stop at the pydicom logger: no root handler noise
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
    from_pydicom = [f"{w.filename}: {w.message}" for w in caught if f"{os.sep}pydicom{os.sep}" in w.filename]
    assert not from_pydicom, from_pydicom
    assert not handler.lines, handler.lines


# -- byte mutations ----------------------------------------------------------------------------

INTERESTING_INTS = [0, 1, 2, 3, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
                    0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]


@st.composite
def mutated(draw, base: bytes, head: int = 512) -> bytes:
    """`base` with 1-4 edits: truncate, flip, insert, delete, overwrite, or a drawn integer written in."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4), label="edits")):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "overwrite", "int"]))
        pos = draw(st.integers(0, min(head, len(data))) | st.integers(0, len(data)), label=op)
        if op == "truncate":
            del data[pos:]
        elif op == "flip" and pos < len(data):
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[pos:pos + len(chunk)] = chunk
        elif op == "int":
            size, order = draw(st.sampled_from([2, 4])), draw(st.sampled_from(["little", "big"]))
            value = draw(st.sampled_from(INTERESTING_INTS) | st.integers(0, 2**32 - 1)) % 2 ** (8 * size)
            data[pos:pos + size] = value.to_bytes(size, order)
    return bytes(data)


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute every PNG chunk CRC, so that a mutation reaches the decoder instead of the CRC check."""
    out, pos = bytearray(data), 8
    while pos + 12 <= len(out):
        length = struct.unpack(">I", out[pos:pos + 4])[0]
        end = pos + 8 + length
        if end + 4 > len(out):
            break
        out[end:end + 4] = struct.pack(">I", zlib.crc32(bytes(out[pos + 4:end])) & 0xFFFFFFFF)
        pos = end + 4
    return bytes(out)


# -- base files --------------------------------------------------------------------------------


def _saved(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def image_bases() -> dict[str, bytes]:
    """Small valid image files of every kind the readers accept, written with Pillow."""
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    g16 = rng.integers(0, 4096, (6, 5), dtype=np.uint16)
    L, RGB, I16 = Image.fromarray(grey), Image.fromarray(rgb), Image.fromarray(g16)
    return {
        "png-L": _saved(L, "PNG"),
        "png-1": _saved(L.convert("1"), "PNG"),
        "png-P": _saved(RGB.convert("P"), "PNG"),
        "png-RGB": _saved(RGB, "PNG"),
        "png-RGBA": _saved(RGB.convert("RGBA"), "PNG"),
        "png-16": _saved(I16, "PNG"),
        "jpeg-L": _saved(L, "JPEG"),
        "jpeg-RGB": _saved(RGB, "JPEG"),
        "jpeg-CMYK": _saved(RGB.convert("CMYK"), "JPEG"),
        "pgm-8": _saved(L, "PPM"),
        "pgm-16": _saved(I16, "PPM"),
        "ppm": _saved(RGB, "PPM"),
        "tiff-16": _saved(I16, "TIFF"),
        "tiff-F": _saved(Image.fromarray(g16.astype(np.float32)), "TIFF"),
        "gif": _saved(RGB.convert("P"), "GIF"),
        "bmp": _saved(RGB, "BMP"),
    }


def dicom_bases(folder: Path) -> dict[str, bytes]:
    """Small valid DICOM files: written here (grey, colour, palette, VOI LUT, RLE, no file meta) and bundled."""
    rng = np.random.default_rng(1)
    g8 = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    g16 = rng.integers(0, 4096, (6, 5), dtype=np.uint16)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    lut = np.arange(256, dtype=np.uint16) * 257
    voi = Dataset()
    voi.LUTDescriptor = [256, 0, 16]
    voi.add_new(0x00283006, "US", [int(v) for v in lut[::-1]])
    palette = {f"{c}PaletteColorLookupTableDescriptor": [256, 0, 16] for c in ("Red", "Green", "Blue")}
    palette |= {f"{c}PaletteColorLookupTableData": lut.tobytes() for c in ("Red", "Green", "Blue")}
    written = {
        "mono16-window": write_dicom(folder / "w.dcm", g16, uid=UID, BitsStored=12, WindowCenter=2000,
                                     WindowWidth=3000, RescaleSlope=2, RescaleIntercept=-100, ImageLaterality="L"),
        "mono1": write_dicom(folder / "m1.dcm", g8, uid=UID, photometric="MONOCHROME1", ImageLaterality="R"),
        "rgb": write_dicom(folder / "rgb.dcm", rgb, uid=UID, photometric="RGB", sop_class=US_SOP, modality="US"),
        "palette": write_dicom(folder / "pal.dcm", g8, uid=UID, photometric="PALETTE COLOR", **palette),
        "voi-lut": write_dicom(folder / "voi.dcm", g8, uid=UID, VOILUTSequence=[voi]),
    }
    out = {name: path.read_bytes() for name, path in written.items()}
    ds = pydicom.dcmread(written["mono16-window"])
    ds.compress(RLELossless)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    out["rle"] = buf.getvalue()
    ds = pydicom.dcmread(written["mono1"])
    ds.file_meta, ds.preamble = FileMetaDataset(), None
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    out["raw-implicit"] = buf.getvalue()  # no preamble, no file meta
    for name in ("MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm", "ExplVR_BigEnd.dcm", "CT_small.dcm"):
        path = get_testdata_file(name, download=False)
        if path is not None:
            out[name] = Path(path).read_bytes()
    return out


class Bases(dict):
    """Base files by name, with a short repr so that hypothesis' failure reports stay readable."""

    def __repr__(self) -> str:
        return f"<{len(self)} base files: {', '.join(sorted(self))}>"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return Bases(image_bases())


@pytest.fixture(scope="module")
def dicoms(workdir) -> dict[str, bytes]:
    return Bases(dicom_bases(workdir / "bases"))


def test_bases_are_read(workdir, images, dicoms):
    """The unmutated base files are all readable, so the mutations start from valid files."""
    for name, data in {**images, **dicoms}.items():
        path = workdir / f"base-{name}"
        path.write_bytes(data)
        out = read_pixels(path)
        assert out.ndim == 2 and np.isfinite(out).all() and 0 <= out.min() <= out.max() <= 1, name


# -- read_pixels / read_rgb: image files -------------------------------------------------------

MAGICS = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"P5\n", b"P2\n", b"P6 ",
          b"\0" * 128 + b"DICM", b"\x08\x00\x05\x00", b"\x02\x00\x00\x00", b"GIF89a", b"BM"]


@fuzz(400)
@given(magic=st.sampled_from(MAGICS), tail=st.binary(max_size=400))
def test_arbitrary_bytes(workdir, magic, tail):
    path = workdir / "arbitrary.bin"
    path.write_bytes(magic + tail)
    assert_readers(path)
    assert_rgb_or_refused(path, pipeline.read_rgb)


@fuzz(1000)
@given(data=st.data())
def test_mutated_image_files(workdir, images, data):
    name = data.draw(st.sampled_from(sorted(images)), label="base")
    blob = data.draw(mutated(images[name], head=128), label="bytes")
    if name.startswith("png") and data.draw(st.booleans(), label="fix CRCs"):
        blob = fix_png_crcs(blob)
    path = workdir / "mutated-image"
    path.write_bytes(blob)
    assert_readers(path)


@fuzz(300)
@given(
    magic=st.sampled_from([b"P2", b"P5", b"P3", b"P6", b"P1", b"P4"]),
    width=st.integers(0, 6) | st.integers(0, 2**32), height=st.integers(0, 6) | st.integers(0, 2**32),
    maxval=st.sampled_from([1, 255, 256, 4095, 65535, 65536, 0]) | st.integers(0, 70000),
    body=st.binary(max_size=200), comment=st.booleans(),
)
def test_pnm_with_drawn_header(workdir, magic, width, height, maxval, body, comment):
    """PGM/PPM headers (the maxval sets the scale) inconsistent with their data."""
    header = magic + b"\n" + (b"# c\n" if comment else b"") + b"%d %d\n" % (width, height)
    if magic not in (b"P1", b"P4"):
        header += b"%d\n" % maxval
    if magic in (b"P1", b"P2", b"P3"):
        body = b" ".join(b"%d" % v for v in body)
    path = workdir / "drawn.pnm"
    path.write_bytes(header + body)
    assert_readers(path)


MODES = {"1": np.bool_, "L": np.uint8, "LA": np.uint8, "P": np.uint8, "RGB": np.uint8, "RGBA": np.uint8,
         "CMYK": np.uint8, "I;16": np.uint16, "I": np.int32, "F": np.float32}
FORMATS = {"PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"), "JPEG": ("L", "RGB", "CMYK"),
           "PPM": ("1", "L", "RGB", "I;16"), "TIFF": ("1", "L", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"),
           "BMP": ("1", "L", "P", "RGB"), "GIF": ("L", "P")}
CHANNELS = {"LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}


@fuzz(300)
@given(data=st.data())
def test_valid_image_files_are_read(workdir, data):
    """Any valid small file in an accepted format and mode reads as a finite 2D image in [0, 1]."""
    fmt = data.draw(st.sampled_from(sorted(FORMATS)), label="format")
    mode = data.draw(st.sampled_from(FORMATS[fmt]), label="mode")
    shape = (data.draw(st.integers(1, 7)), data.draw(st.integers(1, 7)))
    if mode in CHANNELS:
        shape += (CHANNELS[mode],)
    dtype = MODES[mode]
    elements = st.floats(-1e30, 1e30, width=32) if mode == "F" else None
    if mode == "I":
        elements = st.integers(-(2**31), 2**31 - 1)
    pixels = data.draw(arrays(dtype, shape, elements=elements), label="pixels")
    img = Image.fromarray(pixels.astype(np.uint8) if mode in ("1", "P") else pixels)
    img = img.convert(mode) if img.mode != mode else img
    path = workdir / f"valid.{fmt.lower()}"
    img.save(path, fmt)
    note(f"saved {fmt} {img.mode} {img.size}")
    out = read_pixels(path)
    assert out.shape == shape[:2] and out.dtype == np.float32
    assert np.isfinite(out).all() and 0.0 <= out.min() <= out.max() <= 1.0
    assert_rgb_or_refused(path)


# -- read_pixels / read_rgb: DICOM -------------------------------------------------------------


def write_mutated_dicom(data, dicoms: dict[str, bytes], path: Path, head: int) -> Path:
    """One of the base DICOM files with a few edits (favouring its first `head` bytes), written to `path`."""
    name = data.draw(st.sampled_from(sorted(dicoms)), label="base")
    path.write_bytes(data.draw(mutated(dicoms[name], head=head), label="bytes"))
    return path


@fuzz(1000)
@given(data=st.data())
def test_mutated_dicom_files(workdir, dicoms, data):
    assert_readers(write_mutated_dicom(data, dicoms, workdir / "mutated.dcm", head=900))


US_MAX = 65535
HEADER_TAGS = {
    "Rows": st.sampled_from([0, 1, 5, 6, 7, 12, 20_001, US_MAX]) | st.integers(0, US_MAX),
    "Columns": st.sampled_from([0, 1, 4, 5, 6, 10, 20_001, US_MAX]) | st.integers(0, US_MAX),
    "BitsAllocated": st.sampled_from([0, 1, 8, 12, 16, 24, 32, 64]) | st.integers(0, US_MAX),
    "HighBit": st.integers(0, 70) | st.just(US_MAX),
    "PixelRepresentation": st.integers(0, 2),
    "SamplesPerPixel": st.integers(0, 4) | st.just(US_MAX),
    "PlanarConfiguration": st.integers(0, 2),
    "PhotometricInterpretation": st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422",
                                                  "PALETTE COLOR", "HSV", "ARGB", "", "monochrome2"]),
    "NumberOfFrames": st.sampled_from(["0", "1", "2", "-1", "", "999999999"]),
    "RescaleSlope": st.sampled_from(["0", "1", "-1", "1E308", "-1E308", "1E-308", "0.5", "65536"]),
    "RescaleIntercept": st.sampled_from(["0", "-1024", "1E308", "-1E308", "3.5"]),
    "WindowCenter": st.sampled_from(["0", "40", "-1E308", "1E308", "2048", ["10", "20"]]),
    "WindowWidth": st.sampled_from(["0", "1", "-5", "1E308", "4096", "0.5", ["10", "20"]]),
    "VOILUTFunction": st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID", "BOGUS", ""]),
}


@fuzz(600)
@given(data=st.data())
def test_dicom_with_drawn_header(workdir, data):
    """Image Pixel module values (size, bits, samples, photometric, frames, rescale, window) that need
    not fit the pixel data."""
    colour = data.draw(st.booleans(), label="colour")
    dtype = data.draw(st.sampled_from([np.uint8, np.uint16]), label="dtype")
    shape = (data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))) + ((3,) if colour else ())
    pixels = data.draw(arrays(dtype, shape), label="pixels")
    tags = data.draw(st.fixed_dictionaries({}, optional=HEADER_TAGS), label="tags")
    bits_stored = data.draw(st.integers(1, 40) | st.sampled_from([64, 128, 1024, US_MAX]), label="BitsStored")
    tags.setdefault("HighBit", min(bits_stored - 1, US_MAX))
    raw = pixels.tobytes()
    cut = data.draw(st.integers(-len(raw), 8), label="pixel bytes added (negative: removed)")
    tags["PixelData"] = raw[:len(raw) + cut] if cut < 0 else raw + bytes(cut)
    path = workdir / "drawn.dcm"
    try:
        with quiet_pydicom():
            write_dicom(path, pixels, photometric="RGB" if colour else "MONOCHROME2", BitsStored=bits_stored,
                        uid=UID, **tags)
    except (ValueError, TypeError, OSError, struct.error):  # pydicom refused to write the drawn values
        reject()
    assert_readers(path)


COMPRESSED = [RLELossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless,
              JPEG2000, "1.2.840.10008.1.2.4.201", "1.2.3.4.5", ExplicitVRBigEndian, ImplicitVRLittleEndian]


@pytest.fixture(scope="module")
def compressed(dicoms) -> dict[str, tuple[Dataset, bytes]]:
    """Bundled compressed DICOMs as (dataset, first frame's codestream)."""
    out = {}
    for name in ("MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm", "rle"):
        if name in dicoms:
            ds = pydicom.dcmread(io.BytesIO(dicoms[name]))
            out[name] = (ds, next(generate_frames(ds.PixelData, number_of_frames=1)))
    if not out:
        pytest.skip("no compressed DICOM available")
    return Bases(out)


def write_damaged_codestream(data, compressed: dict[str, tuple[Dataset, bytes]], path: Path) -> Path:
    """A compressed DICOM whose frame is damaged (or junk), sometimes labelled with another transfer syntax."""
    name = data.draw(st.sampled_from(sorted(compressed)), label="base")
    base, frame = compressed[name]
    ds = copy.deepcopy(base)
    frame = data.draw(mutated(frame, head=64) | st.binary(max_size=64), label="frame")
    ds.PixelData = encapsulate([frame]) if frame else b""
    if data.draw(st.booleans(), label="other transfer syntax"):
        ds.file_meta.TransferSyntaxUID = data.draw(st.sampled_from(COMPRESSED), label="transfer syntax")
    try:
        with quiet_pydicom():
            ds.save_as(path, enforce_file_format=True)
    except (ValueError, TypeError, OSError, struct.error):
        reject()
    return path


@fuzz(400)
@given(data=st.data())
def test_compressed_dicom_with_mutated_codestream(workdir, compressed, data):
    """Encapsulated frames that are damaged or under another transfer syntax reach the decoders."""
    assert_readers(write_damaged_codestream(data, compressed, workdir / "codestream.dcm"))


@fuzz(300)
@given(data=st.data())
def test_pydicom_warnings_and_log_lines_stay_inside(workdir, dicoms, compressed, data):
    """pixels.py promises that pydicom's warnings and log lines (they may quote tag values) are silenced
    while reading: nothing reaches the warning filters or the handlers of the pydicom loggers."""
    path = workdir / "quiet.dcm"
    if data.draw(st.booleans(), label="damaged codestream"):
        write_damaged_codestream(data, compressed, path)
    else:
        write_mutated_dicom(data, dicoms, path, head=900)
    with no_pydicom_output():
        try:
            describe(load_dicom(path))
        except BreastFusionError:
            pass
        assert_readers(path)


# -- describe(ds) ------------------------------------------------------------------------------

SECRET = "zqxsecret"
LATIN_1 = st.characters(max_codepoint=255, exclude_categories=("Cs",))  # what pydicom writes for CS
FREE_TEXT = st.text(max_size=20) | st.sampled_from(["L CC", "RMLO", "R-MLO", "left", "right breast", "C-View",
                                                    "tomo", "DBT slice", "spot mag", "L MLO R CC", "2D synth"])
CODE = st.sampled_from(["MG", "US", "DX", "CR", "CT", "", "mg", "L", "R", "B", "U", "LR", "BREAST", "FOR PROCESSING",
                        "FOR PRESENTATION", "ORIGINAL", "TOMO", "VOLUME"]) | st.text(LATIN_1, max_size=16)
DESCRIBE_TAGS = {
    "Modality": CODE, "ImageLaterality": CODE, "Laterality": CODE, "BodyPartExamined": CODE,
    "PresentationIntentType": CODE, "ViewPosition": CODE,
    "ImageType": st.lists(CODE, max_size=4),
    "NumberOfFrames": st.sampled_from(["0", "1", "2", "-3", ""]),
    "PatientID": st.sampled_from(["", " ", "P1"]) | st.text(max_size=12),
    "SOPClassUID": st.sampled_from([MG_SOP, US_SOP, "1.2.840.10008.5.1.4.1.1.13.1.3", "1.2.840.10008.5.1.4.1.1.1.2.1",
                                    "1.2.840.10008.5.1.4.1.1.1.1.1", "1.2.3"]),
}


@st.composite
def code_item(draw) -> Dataset:
    item = Dataset()
    item.CodeValue = draw(st.sampled_from(["R-10242", "399162004", "R-10226", "399368009", "X", ""]))
    item.CodeMeaning = draw(st.sampled_from(["cranio-caudal", "medio-lateral oblique", "spot", ""]) | FREE_TEXT)
    return item


def check_describe(ds: Dataset, secret: str | None = None) -> None:
    """describe() returns a DicomInfo whose refusal path is `reject_reason`; it never raises."""
    try:
        info = describe(ds)
    except BreastFusionError:
        return
    assert isinstance(info, DicomInfo)
    assert info.modality is None or isinstance(info.modality, Modality)
    assert info.side is None or isinstance(info.side, Side)
    assert info.view is None or isinstance(info.view, View)
    assert info.kind is None or isinstance(info.kind, Kind)
    assert isinstance(info.patient_id, str) and isinstance(info.flags, list)
    assert all(isinstance(flag, str) for flag in info.flags)
    assert info.reject_reason is None or (isinstance(info.reject_reason, str) and info.reject_reason)
    if info.reject_reason is None:  # an accepted image has what a manifest row needs
        assert info.modality is not None and info.side is not None and info.patient_id
    if secret is not None:  # free text never reaches flags or reasons
        assert secret not in " ".join([*info.flags, info.reject_reason or ""]).lower()


@fuzz(500)
@given(data=st.data())
def test_describe_with_drawn_header(workdir, data):
    tags = data.draw(st.fixed_dictionaries({}, optional=DESCRIBE_TAGS), label="tags")
    for key in ("SeriesDescription", "ProtocolName", "DerivationDescription"):
        if data.draw(st.booleans(), label=key):
            text = data.draw(FREE_TEXT, label=key)
            tags[key] = f"{text} {SECRET}" if data.draw(st.booleans(), label="secret") else text
    if data.draw(st.booleans(), label="view code"):
        item = data.draw(code_item(), label="ViewCodeSequence")
        if data.draw(st.booleans(), label="modifier"):
            item.ViewModifierCodeSequence = [data.draw(code_item(), label="modifier item")]
        tags["ViewCodeSequence"] = [item]
    pixels = None if data.draw(st.booleans(), label="no pixels") else np.zeros((2, 2), np.uint8)
    path = workdir / "describe.dcm"
    try:
        with quiet_pydicom():
            write_dicom(path, pixels, uid=UID, **tags)  # a fixed UID: the file's bytes depend on the draws only
    except (ValueError, TypeError, OSError, struct.error):
        reject()
    mutate = data.draw(st.booleans(), label="mutate")
    if mutate:
        path.write_bytes(data.draw(mutated(path.read_bytes(), head=1200), label="bytes"))
    try:
        ds = load_dicom(path)
    except BreastFusionError:
        return
    check_describe(ds, None if mutate else SECRET)  # a mutation may shift free text into a coded tag


@fuzz(500)
@given(data=st.data())
def test_describe_mutated_dicom_files(workdir, dicoms, data):
    path = write_mutated_dicom(data, dicoms, workdir / "describe-mutated.dcm", head=1200)
    try:
        ds = load_dicom(path)
    except BreastFusionError:
        return
    check_describe(ds)


# -- read_manifest -----------------------------------------------------------------------------

POOL_NAMES = ["img/a.png", "img/b c.png", "img/d,e.png", 'img/q"uote.png', "img/ünï.png", "img/new\nline.png",
              "img/sub/f.png", "other/g.png", "other/h'i.png", "other/j k, l.png", "k.png", "img/🙂.png"]


@pytest.fixture(scope="module")
def pool(workdir) -> list[Path]:
    """Small existing PNG files with awkward names, under the manifest tests' root."""
    root = workdir / "manifests"
    files = []
    for i, name in enumerate(POOL_NAMES):
        file = root / name
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4), 10 * i, np.uint8)).save(file, "PNG")
        files.append(file.resolve())
    return files


def cell_text() -> st.SearchStrategy[str]:
    return st.text(max_size=12) | st.sampled_from(["", " ", ",", '"', '""', "\n", "\r\n", "\r", "'", "\t", "é", "🙂",
                                                   "a,b", 'x"y', "\x00", "\ufeff"])


CELL_VALUES = {
    "patient_id": st.sampled_from(["P1", "P2", " P1 ", "p1"]) | cell_text(),
    "side": st.sampled_from(["L", "R", "l", "left", "RIGHT", "B", "U", "", "LEFT ", "x"]) | cell_text(),
    "modality": st.sampled_from(["MG", "US", "mg", "CT", "", "DX"]) | cell_text(),
    "view": st.sampled_from(["CC", "MLO", "OTHER", "", "ML", "cc"]) | cell_text(),
    "kind": st.sampled_from(["2D", "synthesized", "", "standard", "3D"]) | cell_text(),
    "label": st.sampled_from(["normal", "benign", "malignant", "MALIGNANT", "", "cancer", "1"]) | cell_text(),
    "group": st.sampled_from(["", "G1", "G2"]) | cell_text(),
}


def path_cells(pool: list[Path], root: Path) -> st.SearchStrategy[str]:
    relative = [os.path.relpath(p, root) for p in pool]
    return (
        st.sampled_from(relative)
        | st.sampled_from([str(p) for p in pool])
        | st.sampled_from(["../" + r for r in relative] + ["..", ".", "/", "", "missing.png", "/no/such/file.png",
                                                          "img", "img/../img/a.png", "~/a.png", "a\x00b.png",
                                                          "x" * 300, "/".join(["d"] * 200)])
        | cell_text()
    )


@st.composite
def manifest_text(draw, pool: list[Path], root: Path) -> str:
    """CSV text from drawn header and rows: valid-looking values mixed with junk, written well or badly."""
    extra = st.sampled_from(["extra", "Patient_ID", " side", "\ufeffpatient_id", "", "path"])
    if draw(st.booleans(), label="all columns"):
        header = list(COLUMNS)
    else:
        header = draw(st.lists(st.sampled_from(COLUMNS) | extra, max_size=10), label="header")
    cells = {**CELL_VALUES, "path": path_cells(pool, root)}
    rows = []
    for _ in range(draw(st.integers(0, 5), label="rows")):
        row = [draw(cells.get(col, cell_text()), label=col) for col in header]
        change = draw(st.integers(-2, 2), label="cells added (negative: removed)")
        row = row[:len(row) + change] if change < 0 else row + [draw(cell_text()) for _ in range(change)]
        rows.append(row)
    if rows and draw(st.booleans(), label="duplicate a row"):
        rows.append(list(rows[draw(st.integers(0, len(rows) - 1))]))
    if draw(st.booleans(), label="csv module"):
        buf = io.StringIO()
        writer = csv.writer(buf, quoting=draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])))
        writer.writerow(header)
        writer.writerows(rows)
        return buf.getvalue()
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]), label="newline")
    return newline.join(",".join(row) for row in [header, *rows])  # no quoting at all


def assert_manifest_or_refused(path: Path, **kw) -> None:
    try:
        manifest = read_manifest(path, **kw)
    except ManifestError:
        return
    except BreastFusionError as exc:  # allowed by the contract, but read_manifest documents ManifestError
        pytest.fail(f"read_manifest raised {type(exc).__name__}, not ManifestError: {exc}")
    assert isinstance(manifest, Manifest)
    assert all(isinstance(rec, ImageRecord) for rec in manifest.records)
    for rec in manifest.records:
        assert rec.patient_id and os.path.isabs(rec.path)
        if kw.get("check_files", True):
            assert os.path.isfile(rec.path)
        if kw.get("require_labels", True):
            assert rec.label is not None


@fuzz(600)
@given(data=st.data())
def test_read_manifest_drawn_rows(workdir, pool, data):
    root = workdir / "manifests"
    text = data.draw(manifest_text(pool, root), label="csv")
    path = root / "drawn.csv"
    path.write_text(text, encoding="utf-8", newline="")
    assert_manifest_or_refused(path, require_labels=data.draw(st.booleans(), label="require_labels"),
                               check_files=data.draw(st.booleans(), label="check_files"))


@fuzz(300)
@example(head=b"", body=b"\x80")  # not UTF-8
@example(head=b"patient_id,side,modality,path\n", body=b"a" * 131_073 + b",L,US,a.png\n")  # csv field limit
@given(head=st.sampled_from([b"", ",".join(COLUMNS).encode() + b"\n", b"patient_id,side,modality,path\n"]),
       body=st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8")))
def test_read_manifest_arbitrary_bytes(workdir, head, body):
    path = workdir / "bytes.csv"
    path.write_bytes(head + body)
    assert_manifest_or_refused(path, require_labels=False)


# -- manifest round trip -----------------------------------------------------------------------

ID_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1, max_size=8)


@st.composite
def valid_records(draw, pool: list[Path]) -> list[ImageRecord]:
    """Valid records: per-case labels and groups agree, MG has view and kind, US has neither, paths unique."""
    files = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=8, unique=True), label="files")
    cases = draw(st.lists(st.tuples(ID_TEXT.filter(lambda s: s == s.strip()), st.sampled_from(Side)),
                          min_size=1, max_size=3, unique=True), label="cases")
    labels = {case: draw(st.sampled_from(Label) | st.none(), label="label") for case in cases}
    groups = {case: draw(ID_TEXT.filter(lambda s: s == s.strip()) | st.just(""), label="group") for case in cases}
    records = []
    for file in files:
        case = draw(st.sampled_from(cases), label="case")
        modality = draw(st.sampled_from(Modality), label="modality")
        view, kind = View.NONE, Kind.NONE
        if modality is Modality.MG:
            view = draw(st.sampled_from([View.CC, View.MLO, View.OTHER]), label="view")
            kind = draw(st.sampled_from([Kind.STANDARD, Kind.SYNTHESIZED]), label="kind")
        records.append(ImageRecord(patient_id=case[0], side=case[1], modality=modality, path=str(file), view=view,
                                   kind=kind, label=labels[case], group=groups[case]))
    return records


@fuzz(200)
@given(data=st.data())
def test_manifest_round_trip(workdir, pool, data):
    records = data.draw(valid_records(pool), label="records")
    folder = data.draw(st.sampled_from(["", "img", "img/sub", "csvs/deeper"]), label="folder")
    path = write_manifest(records, workdir / "manifests" / folder / "round.csv")
    manifest = read_manifest(path, require_labels=all(rec.label is not None for rec in records))
    assert manifest.records == records
