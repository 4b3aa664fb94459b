"""The one pixel reader (ingest.pixels): DICOM windowing, inversion, bit depths, colour, image files, bad files."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import JPEGLSLossless

from breastfusion.errors import InputImageError
from breastfusion.ingest import pixels
from breastfusion.ingest.pixels import read_pixels, read_rgb
from breastfusion.preprocess.images import read_grey

from dicom_files import US_SOP, write_dicom


def ramp(shape=(16, 32), top=255, dtype=np.uint8) -> np.ndarray:
    return np.linspace(0, top, shape[0] * shape[1]).round().astype(dtype).reshape(shape)


def bundled(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available")
    return str(path)


def decoder_or_skip(uid) -> None:
    if not pixels.get_decoder(uid).is_available:
        pytest.skip(f"no decoder installed for {uid.name}")


# -- DICOM -------------------------------------------------------------------------------------


def test_dicom_without_window_is_min_max(tmp_path):
    data = ramp() // 2 + 40
    out = read_pixels(write_dicom(tmp_path / "a.dcm", data))
    assert out.dtype == np.float32 and out.shape == data.shape
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.all(np.diff(out.ravel()) >= 0)  # monotone in the stored value


def test_monochrome1_is_inverted(tmp_path):
    data = ramp()
    mono2 = read_pixels(write_dicom(tmp_path / "m2.dcm", data))
    mono1 = read_pixels(write_dicom(tmp_path / "m1.dcm", data, photometric="MONOCHROME1"))
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    assert mono1[0, 0] == 1.0  # lowest stored value is white in MONOCHROME1


def test_16_bit_with_12_bits_stored_and_window(tmp_path):
    data = ramp(top=4095, dtype=np.uint16)
    path = write_dicom(tmp_path / "w.dcm", data, BitsStored=12, WindowCenter=2048, WindowWidth=1024)
    out = read_pixels(path)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.all(out[data <= 1536] == 0.0) and np.all(out[data >= 2560] == 1.0)
    middle = np.abs(data.astype(int) - 2048).argmin()
    assert out.ravel()[middle] == pytest.approx(0.5, abs=0.01)


def test_rescale_then_window_in_rescaled_units(tmp_path):
    data = ramp(top=2048, dtype=np.uint16)
    path = write_dicom(tmp_path / "ct.dcm", data, RescaleSlope=1, RescaleIntercept=-1024,
                       WindowCenter=0, WindowWidth=400)
    out = read_pixels(path)
    raw_zero = np.abs(data.astype(int) - 1024).argmin()  # stored 1024 -> value 0 -> window centre
    assert out.ravel()[raw_zero] == pytest.approx(0.5, abs=0.02)
    assert np.all(out[data < 1024 - 200] == 0.0) and np.all(out[data > 1024 + 200] == 1.0)


def test_voi_lut_sequence_is_applied_over_its_own_range(tmp_path):
    data = ramp(top=255, dtype=np.uint16)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.add_new(0x00283006, "US", [1000 + 4 * (255 - i) for i in range(256)])  # LUTData, inverting
    path = write_dicom(tmp_path / "lut.dcm", data, BitsStored=8, VOILUTSequence=[item])
    out = read_pixels(path)
    assert out[0, 0] == pytest.approx(1.0) and out[-1, -1] == pytest.approx(0.0)


def test_invalid_window_falls_back_to_min_max(tmp_path):
    data = ramp()
    out = read_pixels(write_dicom(tmp_path / "bad_window.dcm", data, WindowCenter=10, WindowWidth=0))
    assert out.min() == 0.0 and out.max() == 1.0


def test_multi_frame_is_refused(tmp_path):
    volume = np.stack([ramp()] * 3)
    path = write_dicom(tmp_path / "dbt.dcm", volume, NumberOfFrames=3)
    with pytest.raises(InputImageError, match=r"multi-frame object \(3 frames\)"):
        read_pixels(path)


def test_colour_ultrasound_keeps_colour(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., :] = ramp((20, 30))[..., None]
    rgb[5:10, 5:10] = (255, 0, 0)  # a colour Doppler blob
    path = write_dicom(tmp_path / "us.dcm", rgb, photometric="RGB", sop_class=US_SOP, Modality="US")
    colour = read_rgb(path)
    assert colour is not None and colour.shape == (20, 30, 3) and colour.dtype == np.float32
    np.testing.assert_allclose(colour[7, 7], [1.0, 0.0, 0.0])
    grey = read_pixels(path)
    assert grey.shape == (20, 30) and grey[7, 7] == pytest.approx(0.299, abs=1e-3)


def test_rgb_dicom_with_grey_content_is_grey(tmp_path):
    rgb = np.repeat(ramp((20, 30))[..., None], 3, axis=2)
    path = write_dicom(tmp_path / "grey_rgb.dcm", rgb, photometric="RGB", sop_class=US_SOP)
    assert read_rgb(path) is None
    np.testing.assert_allclose(read_pixels(path), ramp((20, 30)) / 255.0, atol=1e-3)


def test_dicom_without_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "nopix.dcm", ramp())
    ds = pixels.load_dicom(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(InputImageError, match="DICOM without pixel data"):
        read_pixels(path)


def test_missing_decoder_names_the_plugins(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "jls.dcm", ramp())
    ds = pixels.load_dicom(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless

    class Unavailable:
        is_available = False

    monkeypatch.setattr(pixels, "get_decoder", lambda uid: Unavailable())
    with pytest.raises(InputImageError, match="install pylibjpeg") as err:
        pixels.dataset_image(ds, path)
    assert "JPEG-LS" in str(err.value) and "\n" not in str(err.value)


def test_huge_dicom_dimensions_are_refused_before_decoding(tmp_path):
    path = write_dicom(tmp_path / "bomb.dcm", ramp())
    ds = pixels.load_dicom(path)
    ds.Rows, ds.Columns = 30000, 30000
    ds.save_as(path)
    with pytest.raises(InputImageError, match="image too large"):
        read_pixels(path)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm",
                                  "MR_small_bigendian.dcm", "JPGExtended.dcm"])
def test_bundled_grey_files(name):
    out = read_pixels(bundled(name))
    assert out.ndim == 2 and out.dtype == np.float32
    assert 0.0 <= out.min() < out.max() <= 1.0


def test_bundled_jpeg_ls_16_bit():
    decoder_or_skip(JPEGLSLossless)
    out = read_pixels(bundled("JPEGLSNearLossless_16.dcm"))
    assert out.shape == (50, 10) and out.max() == 1.0


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_gdcm.dcm", "SC_ybr_full_422_uncompressed.dcm",
                                  "examples_palette.dcm"])
def test_bundled_colour_files(name):
    colour = read_rgb(bundled(name))
    assert colour is not None and colour.shape[-1] == 3 and 0.0 <= colour.min() <= colour.max() <= 1.0


@pytest.mark.parametrize("name, reason", [
    ("MR_truncated.dcm", "cannot decode pixel data"),
    ("rtdose.dcm", "multi-frame object"),
    ("rtplan.dcm", "DICOM without pixel data"),
])
def test_bundled_bad_files(name, reason):
    path = bundled(name)
    with pytest.raises(InputImageError, match=reason) as err:
        read_pixels(path)
    assert str(err.value).startswith(f"{path}: ")


def test_read_grey_delegates_to_read_pixels(tmp_path):
    path = write_dicom(tmp_path / "g.dcm", ramp(), photometric="MONOCHROME1")
    np.testing.assert_array_equal(read_grey(str(path)), read_pixels(path))


# -- image files -------------------------------------------------------------------------------


def test_png_8_bit(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(ramp()).save(path)
    np.testing.assert_allclose(read_pixels(path), ramp() / 255.0, atol=1e-6)


@pytest.mark.parametrize("top", [65535, 4095, 1023])
def test_png_16_bit_scaled_by_its_bit_depth(tmp_path, top):
    path = tmp_path / "a16.png"
    data = ramp(top=top, dtype=np.uint16)
    Image.fromarray(data).save(path)
    out = read_pixels(path)
    assert out.max() == 1.0 and out.min() == 0.0
    np.testing.assert_allclose(out, data / top, atol=1e-6)


@pytest.mark.parametrize("maxval", [65535, 4095])
def test_pgm_p5_16_bit(tmp_path, maxval):
    data = ramp(top=maxval, dtype=np.uint16)
    path = tmp_path / "a.pgm"
    path.write_bytes(f"P5\n{data.shape[1]} {data.shape[0]}\n{maxval}\n".encode() + data.astype(">u2").tobytes())
    out = read_pixels(path)
    np.testing.assert_allclose(out, data / maxval, atol=2e-4)


def test_pgm_p2_ascii(tmp_path):
    path = tmp_path / "a.pgm"
    path.write_text("P2\n3 2\n15\n0 5 15\n1 2 3\n")
    out = read_pixels(path)
    np.testing.assert_allclose(out, np.array([[0, 5, 15], [1, 2, 3]]) / 15, atol=2 / 255)


def test_jpeg_grey_and_rgb_with_grey_content(tmp_path):
    grey = ramp((32, 32))
    Image.fromarray(grey).save(tmp_path / "g.jpg", quality=95)
    Image.fromarray(np.repeat(grey[..., None], 3, 2)).save(tmp_path / "rgb.jpg", quality=95)
    Image.fromarray(np.repeat(grey[..., None], 3, 2)).save(tmp_path / "rgb.png")
    for name in ("g.jpg", "rgb.jpg", "rgb.png"):
        assert read_rgb(tmp_path / name) is None, name
        np.testing.assert_allclose(read_pixels(tmp_path / name), grey / 255.0, atol=0.03)


def test_colour_png_gives_colour(tmp_path):
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[..., 2] = 200
    Image.fromarray(rgb).save(tmp_path / "c.png")
    colour = read_rgb(tmp_path / "c.png")
    assert colour is not None
    np.testing.assert_allclose(colour[0, 0], [0, 0, 200 / 255], atol=1e-6)
    assert read_pixels(tmp_path / "c.png")[0, 0] == pytest.approx(0.114 * 200 / 255, abs=1e-4)


def test_extension_does_not_matter(tmp_path):
    Image.fromarray(ramp()).save(tmp_path / "a.png")
    shutil.copy(tmp_path / "a.png", tmp_path / "really_a_png.dcm")
    write_dicom(tmp_path / "dicom.png", ramp())
    assert read_pixels(tmp_path / "really_a_png.dcm").shape == ramp().shape
    assert read_pixels(tmp_path / "dicom.png").shape == ramp().shape


# -- bad files ---------------------------------------------------------------------------------


def _png_claiming_size(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _bad_files(tmp: Path) -> dict[str, str]:
    """name -> expected reason; each file is written here."""
    (tmp / "empty.png").write_bytes(b"")
    Image.fromarray(ramp((64, 64))).save(tmp / "full.png")
    data = (tmp / "full.png").read_bytes()
    (tmp / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp / "text.png").write_text("this is not an image\n")
    _png_claiming_size(tmp / "bomb.png", 30000, 30000)
    _png_claiming_size(tmp / "wide.png", 25000, 10)
    (tmp / "folder.png").mkdir()
    return {
        "empty.png": "zero-byte file",
        "truncated.png": "truncated or corrupt image file",
        "text.png": "not an image or DICOM file",
        "bomb.png": "image too large",
        "wide.png": "image too large",
        "folder.png": "not a regular file",
        "missing.png": "file not found",
    }


def test_bad_files_give_one_line_naming_the_file(tmp_path):
    for name, reason in _bad_files(tmp_path).items():
        path = tmp_path / name
        for reader in (read_pixels, read_rgb):
            with pytest.raises(InputImageError) as err:
                reader(path)
            message = str(err.value)
            assert message.startswith(f"{path}: ") and reason in message, message
            assert "\n" not in message


def test_corrupted_files_raise_only_input_image_error(tmp_path):
    """A small seeded fuzz: truncations and byte flips of a PNG, a JPEG and DICOM files."""
    rng = np.random.default_rng(0)
    Image.fromarray(ramp((24, 24))).save(tmp_path / "a.png")
    Image.fromarray(ramp((24, 24))).save(tmp_path / "a.jpg")
    write_dicom(tmp_path / "a.dcm", ramp((24, 24), top=4095, dtype=np.uint16), BitsStored=12)
    write_dicom(tmp_path / "b.dcm", np.repeat(ramp((8, 8))[..., None], 3, 2), photometric="RGB")
    sources = [(tmp_path / n).read_bytes() for n in ("a.png", "a.jpg", "a.dcm", "b.dcm")]
    target = tmp_path / "fuzz"
    for i in range(80):
        data = bytearray(sources[i % len(sources)])
        if i % 2:
            data = data[: int(rng.integers(1, len(data)))]
        else:
            for pos in rng.integers(0, len(data), size=8):
                data[pos] = int(rng.integers(0, 256))
        target.write_bytes(bytes(data))
        try:
            out = read_pixels(target)
        except InputImageError as exc:
            assert str(exc).startswith(f"{target}: ") and "\n" not in str(exc)
        else:
            assert out.ndim == 2 and np.isfinite(out).all() and 0.0 <= out.min() and out.max() <= 1.0
