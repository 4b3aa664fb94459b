"""Automatic preprocessing: breast crop, orientation, US scan-area crop, colour policy, cache.

All but the last test use generated images (seconds). The last one runs the
crops on a sample of the public datasets in ../shared/datasets.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from breastfusion.errors import InputImageError
from breastfusion.preprocess.contact_sheet import contact_sheet
from breastfusion.preprocess.mammo import (
    CropInfo,
    MammoCrop,
    chest_wall_side,
    crop_breast,
    orient,
    orient_info,
    otsu_threshold,
)
from breastfusion.preprocess.pipeline import PreprocessCache, Preprocessor
from breastfusion.preprocess.ultrasound import (
    UltrasoundCrop,
    apply_colour_policy,
    colour_fraction,
    crop_scan_area,
)
from breastfusion.vocab import Modality, Side

from conftest import SHARED_DATASETS, requires_shared_datasets

# -- generated images -----------------------------------------------------------------------------

BREAST_ROWS, BREAST_COLS = (18, 239), (0, 151)  # bounding box of the synthetic breast (half-ellipse)
LABEL = (10, 270, 40, 310)  # bright film label in the far corner (top, left, bottom, right)
INNER_LABEL = (222, 120, 246, 146)  # a marker inside the breast's bounding box, not touching the breast


def synthetic_mammogram(seed: int = 0, chest_wall: str = "left") -> np.ndarray:
    """256 x 320: a half-ellipse breast against one edge, labels, salt noise on a noisy background."""
    rng = np.random.default_rng(seed)
    h, w = 256, 320
    img = np.abs(rng.normal(0.0, 0.01, (h, w))).astype(np.float32)  # film background noise
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - 128) / 110.0) ** 2 + (xx / 150.0) ** 2 < 1.0
    texture = ndi.gaussian_filter(rng.random((h, w)), 3)
    thickness = np.sqrt(np.clip(1.0 - ((yy - 128) / 110.0) ** 2 - (xx / 150.0) ** 2, 0, 1))
    img[inside] = (0.25 + 0.35 * thickness + 0.3 * texture)[inside]
    y0, x0, y1, x1 = LABEL
    img[y0:y1, x0:x1] = 0.95
    y0, x0, y1, x1 = INNER_LABEL
    img[y0:y1, x0:x1] = 0.9
    salt = rng.random((h, w)) < 0.005
    img[salt] = 1.0
    img = np.clip(img, 0, 1)
    return img if chest_wall == "left" else np.ascontiguousarray(img[:, ::-1])


SCAN_BOX = (40, 60, 260, 330)


def synthetic_ultrasound(seed: int = 0, shape: str = "rect") -> np.ndarray:
    """300 x 400 screen capture: speckled scan area, text, a ruler, a flat UI panel, black border."""
    rng = np.random.default_rng(seed)
    img = np.zeros((300, 400), np.float32)
    t, x0, b, r = SCAN_BOX
    speckle = ndi.gaussian_filter(rng.rayleigh(0.25, size=(b - t, r - x0)), 0.8)
    area = np.clip(speckle * np.linspace(1.0, 0.5, b - t)[:, None], 0, 1)
    yy, xx = np.ogrid[: b - t, : r - x0]
    area[((yy - 90) / 30) ** 2 + ((xx - 120) / 45) ** 2 < 1] *= 0.1  # anechoic cyst
    if shape == "trapezoid":  # sector-like: black wedges at both sides, widening with depth
        yy, xx = np.mgrid[: b - t, : r - x0]
        edge = 40 * (1 - yy / (b - t))
        area[(xx < edge) | (xx > (r - x0) - edge)] = 0
    img[t:b, x0:r] = area
    for y, x in [(8, 6), (8, 30), (275, 200), (275, 230), (275, 260)]:  # text
        img[y:y + 12, x:x + 8][rng.random((12, 8)) < 0.4] = 1.0
    if shape == "trapezoid":  # vendor logo in the black corner beside the sector, inside the bbox
        img[t + 5:t + 15, x0 + 5:x0 + 25][rng.random((10, 20)) < 0.5] = 1.0
    img[t:b, r + 12] = 0.9  # ruler with ticks
    img[t:b:10, r + 8:r + 16] = 0.9
    img[270:292, 10:150] = 0.3  # flat grey UI panel with text
    img[275:287, 20:120:12] = 1.0
    return img


def doppler_rgb(seed: int = 0) -> np.ndarray:
    grey = synthetic_ultrasound(seed)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb[120:160, 150:200] = (0.9, 0.1, 0.05)  # red flow
    rgb[160:180, 150:200] = (0.1, 0.2, 0.95)  # blue flow
    return rgb


def save_png(path: Path, arr: np.ndarray) -> Path:
    data = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(data, mode="RGB" if data.ndim == 3 else "L").save(path)
    return path


def chest_wall_mass(img: np.ndarray) -> tuple[float, float]:
    """Breast mass in the left and right halves."""
    k = img.shape[1] // 2
    return float(img[:, :k].sum()), float(img[:, -k:].sum())


# -- mammogram crop -------------------------------------------------------------------------------


def test_otsu_splits_two_levels():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.2, 0.02, 1000), rng.normal(0.7, 0.02, 1000)])
    assert 0.3 < otsu_threshold(np.clip(values, 0, 1)) < 0.6


def test_crop_keeps_breast_and_drops_labels():
    img = synthetic_mammogram()
    out, info = crop_breast(img)
    top, left, bottom, right = info.bbox
    assert not info.fallback and info.flags == ()
    # the breast is inside the crop, with a small margin at most
    assert top <= BREAST_ROWS[0] and bottom >= BREAST_ROWS[1] - 1 and left == 0
    assert BREAST_COLS[1] - 2 <= right <= BREAST_COLS[1] + 10
    assert bottom - top <= BREAST_ROWS[1] - BREAST_ROWS[0] + 12
    # the far label is outside the crop
    assert right < LABEL[1]
    # the marker inside the box is masked to 0; the breast is kept
    y0, x0, y1, x1 = INNER_LABEL
    assert out[y0 - top:y1 - top, x0 - left:x1 - left].max() == 0.0
    assert out.shape == (bottom - top, right - left)
    assert out[128 - top, 40 - left] > 0.2
    assert 0.2 < info.area_fraction < 0.5


def test_crop_with_otsu_also_works_on_the_synthetic_image():
    out, info = crop_breast(synthetic_mammogram(), MammoCrop(method="otsu"))
    assert not info.fallback and info.bbox[3] < LABEL[1]


@pytest.mark.parametrize("value", [0.0, 1.0, 0.5])
def test_blank_image_takes_the_fallback(value):
    img = np.full((200, 160), value, np.float32)
    out, info = crop_breast(img)
    assert info.fallback and "fallback" in info.flags and "blank" in info.reason
    assert info.bbox == (0, 0, 200, 160) and out.shape == img.shape
    out, info = crop_scan_area(img)
    assert info.fallback and "fallback" in info.flags and info.reason
    assert out.shape == img.shape


def test_tiny_component_takes_the_fallback():
    img = np.zeros((200, 200), np.float32)
    img[90:100, 90:100] = 0.8  # a label alone, 0.25% of the image
    out, info = crop_breast(img)
    assert info.fallback and "covers" in info.reason and out.shape == img.shape


# -- orientation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [Side.LEFT, Side.RIGHT, None])
@pytest.mark.parametrize("target", ["left", "right"])
def test_orient_puts_the_chest_wall_on_the_fixed_side(side, target):
    # a LEFT breast is displayed with its chest wall at the left edge, a RIGHT one at the right
    wall = "right" if side is Side.RIGHT else "left"
    cropped, info = crop_breast(synthetic_mammogram(chest_wall=wall))
    out, info = orient_info(cropped, side, target, info)
    left_mass, right_mass = chest_wall_mass(out)
    assert (left_mass > right_mass) == (target == "left")
    assert info.flipped == (wall != target)
    assert info.chest_wall == wall
    assert "laterality_mismatch" not in info.flags
    assert np.array_equal(orient(cropped, side, target), out)


def test_content_wins_over_a_contradicting_laterality_and_is_flagged():
    cropped, info = crop_breast(synthetic_mammogram(chest_wall="left"))
    out, info = orient_info(cropped, Side.RIGHT, "left", info)  # tag says right, pixels say left
    assert "laterality_mismatch" in info.flags and not info.flipped
    assert np.array_equal(out, cropped)


def test_symmetric_content_defers_to_laterality():
    yy, xx = np.mgrid[:200, :200]
    disk = (((yy - 100) ** 2 + (xx - 100) ** 2) < 70**2).astype(np.float32) * 0.6
    assert chest_wall_side(disk)[0] is None
    out, info = orient_info(disk, Side.RIGHT, "left")
    assert info.flipped and info.chest_wall == "right" and info.flags == ()
    out, info = orient_info(disk, None, "left")
    assert not info.flipped and "orientation_unknown" in info.flags


# -- ultrasound -----------------------------------------------------------------------------------


def test_scan_area_crop_matches_the_scan_box():
    img = synthetic_ultrasound()
    out, info = crop_scan_area(img)
    assert not info.fallback
    assert np.allclose(info.bbox, SCAN_BOX, atol=3), info.bbox
    assert out.shape == (info.bbox[2] - info.bbox[0], info.bbox[3] - info.bbox[1])


def test_scan_area_crop_of_a_sector_masks_the_logo_in_its_corner():
    img = synthetic_ultrasound(shape="trapezoid")
    out, info = crop_scan_area(img)
    assert np.allclose(info.bbox, SCAN_BOX, atol=5), info.bbox  # the wedge tips at the bottom may go
    top, left = info.bbox[:2]
    t, x0 = SCAN_BOX[:2]
    assert out[t + 5 - top:t + 15 - top, x0 + 5 - left:x0 + 25 - left].max() == 0.0  # logo gone
    assert out[100 - top, 195 - left] > 0  # tissue kept


def test_colour_fraction_and_policy(tmp_path):
    rgb = doppler_rgb()
    grey_rgb = np.repeat(synthetic_ultrasound()[..., None], 3, axis=-1)
    assert colour_fraction(rgb) > 0.02
    assert colour_fraction(grey_rgb) == 0.0
    path = save_png(tmp_path / "doppler case 7.png", rgb)
    with pytest.raises(InputImageError) as err:
        apply_colour_policy(rgb, "reject", path)
    message = str(err.value)
    assert "doppler case 7.png" in message and "%" in message and "\n" not in message
    with pytest.raises(InputImageError, match="doppler case 7.png"):
        Preprocessor(colour="reject").process(path, Modality.US, None)
    out, info = Preprocessor(colour="grey", size=64).process_info(path, Modality.US, None)
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert "colour_greyed" in info.flags and info.colour_fraction > 0.02
    _, crop_info = crop_scan_area(synthetic_ultrasound(), rgb)
    assert "colour" in crop_info.flags


def test_a_few_tinted_pixels_are_not_colour():
    rgb = np.repeat(synthetic_ultrasound()[..., None], 3, axis=-1)
    rgb[50:52, 100:110] = (1.0, 1.0, 0.0)  # a short yellow caliper mark: 20 pixels
    rgb[200:230, 100:130] *= (1.0, 1.0, 0.9)  # a faint tint
    assert colour_fraction(rgb) < UltrasoundCrop().colour_max_fraction
    grey, fraction, acted = apply_colour_policy(rgb, "reject", "x.png")
    assert not acted and grey.shape == rgb.shape[:2]


# -- pipeline and cache ---------------------------------------------------------------------------


def test_process_gives_a_square_float_image(tmp_path):
    mg = save_png(tmp_path / "mg.png", synthetic_mammogram(chest_wall="right"))
    us = save_png(tmp_path / "us.png", synthetic_ultrasound())
    blank = save_png(tmp_path / "blank.png", np.zeros((50, 80)))
    pre = Preprocessor(size=96)
    for path, modality, side in ((mg, "MG", "R"), (us, "US", None), (blank, "MG", None), (blank, "US", None)):
        out = pre.process(path, modality, side)
        assert out.shape == (96, 96) and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
    out = pre.process(mg, Modality.MG, Side.RIGHT)
    left_mass, right_mass = chest_wall_mass(out)
    assert left_mass > right_mass  # chest wall moved to the left
    # cropping off: the whole image, padded (the label is still there)
    whole = Preprocessor(size=96, enabled=False, chest_wall="none").process(mg, "MG", "R")
    assert whole[:, :10].sum() > 0 and not np.allclose(whole, out)


def test_preprocessor_key_holds_every_parameter():
    key = Preprocessor().key()
    json.dumps(key)
    assert {"size", "enabled", "chest_wall", "colour", "mammo", "ultrasound", "format"} <= set(key)
    assert key["mammo"]["min_area"] == MammoCrop().min_area
    assert key["ultrasound"]["colour_max_fraction"] == UltrasoundCrop().colour_max_fraction
    assert Preprocessor().key_hash() == Preprocessor().key_hash()
    assert Preprocessor(size=128).key_hash() != Preprocessor().key_hash()
    assert Preprocessor(mammo=MammoCrop(rel=0.1)).key_hash() != Preprocessor().key_hash()
    with pytest.raises(ValueError):
        Preprocessor(colour="keep")


def test_cache_reuses_and_recomputes_on_change(tmp_path):
    path = save_png(tmp_path / "mg.png", synthetic_mammogram())
    cache = PreprocessCache(tmp_path / "cache", Preprocessor(size=64))
    first = cache.get(path, Modality.MG, Side.LEFT)
    second = cache.get(path, Modality.MG, Side.LEFT)
    assert (cache.computed, cache.reused) == (1, 1)
    assert np.array_equal(first, second)
    files = sorted((tmp_path / "cache" / "preprocessed").rglob("*.npy"))
    assert len(files) == 1 and files[0].parent == cache.dir
    assert (cache.dir / "key.json").is_file()
    assert not list(cache.dir.glob("*.tmp"))
    # a new cache object (another run) reuses the file
    again = PreprocessCache(tmp_path / "cache", Preprocessor(size=64))
    again.get(path, "MG", "L")
    assert (again.computed, again.reused) == (0, 1)
    # a renamed copy with the same content is not reprocessed
    copy = tmp_path / "renamed.png"
    copy.write_bytes(path.read_bytes())
    again.get(copy, "MG", "L")
    assert (again.computed, again.reused) == (0, 2)
    # changed content at the same path is reprocessed
    save_png(path, synthetic_mammogram(seed=1))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    third = cache.get(path, Modality.MG, Side.LEFT)
    assert (cache.computed, cache.reused) == (2, 1)
    assert not np.array_equal(first, third)
    # other parameters: another folder
    other = PreprocessCache(tmp_path / "cache", Preprocessor(size=32))
    assert other.get(path, "MG", "L").shape == (32, 32)
    assert other.computed == 1 and other.dir != cache.dir
    assert len(list((tmp_path / "cache" / "preprocessed").iterdir())) == 2


@pytest.mark.parametrize("damage,reused", [
    ("none", True),  # the header the cache writes: read straight into an array
    ("fortran", True),  # another valid header: np.load reads it
    ("float64", False), ("wrong shape", False), ("truncated", False), ("one byte more", False), ("garbage", False),
])
def test_cached_file_is_read_only_when_it_holds_the_image(tmp_path, damage, reused):
    path = save_png(tmp_path / "mg.png", synthetic_mammogram())
    cache = PreprocessCache(tmp_path / "cache", Preprocessor(size=32))
    first = cache.get(path, "MG", "L")
    file = cache.file_for(path, "MG", "L")
    raw = file.read_bytes()
    if damage == "fortran":
        np.save(file, np.asfortranarray(first))
    elif damage == "float64":
        np.save(file, first.astype(np.float64))
    elif damage == "wrong shape":
        np.save(file, np.zeros((16, 16), np.float32))
    elif damage == "truncated":
        file.write_bytes(raw[:-10])
    elif damage == "one byte more":
        file.write_bytes(raw + b"\0")
    elif damage == "garbage":
        file.write_bytes(b"not an array")
    again = PreprocessCache(tmp_path / "cache", Preprocessor(size=32))
    out = again.get(path, "MG", "L")
    assert (again.reused, again.computed) == ((1, 0) if reused else (0, 1))
    assert out.dtype == np.float32 and out.flags.writeable and np.array_equal(out, first)


def test_cache_hash_is_memoised(tmp_path, monkeypatch):
    path = save_png(tmp_path / "us.png", synthetic_ultrasound())
    cache = PreprocessCache(tmp_path / "cache", Preprocessor(size=32))
    cache.get(path, "US", None)
    opened = []
    real_open = open

    def spy(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    cache.get(path, "US", None)
    assert str(path) not in opened and cache.reused == 1


def test_contact_sheet_writes_a_png(tmp_path):
    mg = save_png(tmp_path / "mg.png", synthetic_mammogram())
    us = save_png(tmp_path / "us.png", synthetic_ultrasound())
    colour = save_png(tmp_path / "doppler.png", doppler_rgb())
    blank = save_png(tmp_path / "blank.png", np.ones((40, 40)))
    out = contact_sheet([(str(mg), Modality.MG, Side.LEFT), (str(us), Modality.US, None),
                         (str(colour), Modality.US, None), (str(blank), Modality.MG, None)],
                        Preprocessor(size=64), tmp_path / "sheet" / "contact.png", columns=2)
    assert out.is_file()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > img.size[1] > 100


def test_crop_info_describe():
    info = CropInfo.whole((10, 20), "no contrast").flagged("colour", colour_fraction=0.5)
    text = info.describe()
    assert "10x20" in text and "fallback" in text and "colour" in text


# -- real data ------------------------------------------------------------------------------------


def _every(paths: list[Path], n: int) -> list[Path]:
    paths = sorted(paths)
    step = max(1, len(paths) // n)
    return paths[::step][:n]


def test_crops_on_public_datasets():
    requires_shared_datasets()
    busi = [p for p in (SHARED_DATASETS / "BUSI" / "Dataset_BUSI_with_GT").glob("*/*.png") if "_mask" not in p.name]
    mias = list((SHARED_DATASETS / "mini-MIAS" / "all-mias").glob("mdb*"))
    cesm = list((SHARED_DATASETS / "CDD-CESM" / "Subtracted images of CDD-CESM").glob("P*"))
    assert busi and mias and cesm, "public datasets incomplete"
    pre = Preprocessor(size=64, colour="grey")
    fallbacks, mismatches, results = 0, 0, 0
    for path in _every(busi, 10):
        cropped, info = pre.crop(path, Modality.US, None)
        h, w = info.shape
        fallbacks += info.fallback
        # BUSI images are captured close to the scan area: the crop keeps most of them
        assert cropped.shape[0] >= 0.4 * h and cropped.shape[1] >= 0.8 * w, (path.name, info)
        results += 1
    mg_items = [(p, "R" if int(re.findall(r"\d+", p.name)[0]) % 2 else "L") for p in _every(mias, 6)]
    mg_items += [(p, p.name.split("_")[1]) for p in _every(cesm, 6)]
    for path, side in mg_items:
        cropped, info = pre.crop(path, Modality.MG, side)
        fallbacks += info.fallback
        mismatches += "laterality_mismatch" in info.flags
        assert 0.1 <= info.area_fraction <= 0.95, (path.name, info)
        assert cropped.size >= 0.15 * info.shape[0] * info.shape[1], (path.name, info)
        assert chest_wall_side(cropped)[0] in ("left", None), (path.name, info)
        results += 1
    assert results == 22
    assert fallbacks <= 2 and mismatches == 0


def test_cache_keeps_each_images_notes_and_fills_them_for_old_entries(tmp_path):
    blank = save_png(tmp_path / "blank.png", np.zeros((40, 40)))
    normal = save_png(tmp_path / "mg.png", synthetic_mammogram())
    cache = PreprocessCache(tmp_path / "cache", Preprocessor(size=32))
    assert cache.notes(blank, "MG", "L") == ("fallback",) and cache.notes(normal, "MG", "L") == ()
    assert cache.computed == 0  # notes of an image not cached yet: processed once, cached with its notes
    cache.get(blank, "MG", "L")
    assert (cache.computed, cache.reused) == (0, 1)
    notes_file = cache.file_for(blank, "MG", "L").with_name(cache.file_for(blank, "MG", "L").stem + ".notes.json")
    assert json.loads(notes_file.read_text()) == {"notes": ["fallback"]}
    notes_file.unlink()  # an entry from a version that kept no notes
    again = PreprocessCache(tmp_path / "cache", Preprocessor(size=32))
    assert again.notes(blank, "MG", "L") == ("fallback",) and notes_file.is_file()
