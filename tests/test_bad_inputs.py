"""Bad inputs, one table: what every stage does with an input that is wrong.

Each row of `CASES` is one bad input, built here in a temporary folder (no binary file is
committed), the stage that meets it, and its documented behaviour, which the test checks
precisely. A behaviour is either

* an error: a `BreastFusionError` subclass whose message names the file (or the key, or the
  manifest line) and the reason, on one line (a ManifestError lists one line per problem);
  through the CLI, one `error: ...` line and exit code 3 (an input error; errors.ExitCode), no traceback; or
* a fallback: the file is skipped with its reason (ingest summary and skipped.csv), an image is
  refused (refused_images.json) or kept with a flag, a case is excluded and counted, and the
  other inputs go through.

A case whose behaviour today is a bug (a raw Python exception, a traceback from the CLI, a run
that dies instead of going on) is a strict xfail whose reason starts with "BUG:" and whose
`raises` names the exception that escapes: it fails loudly the day the bug is fixed, and the
mark must then go. docs/reliability.md lists every case; `test_reliability_doc_lists_every_case`
keeps the two in step.
"""

from __future__ import annotations

import csv
import json
import pickle
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from PIL import Image
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from safetensors.torch import load_file, save_file

from breastfusion.cli import main
from breastfusion.config import BackboneConfig, CVConfig, RunConfig, TrainConfig, to_dict
from breastfusion.errors import (
    BreastFusionError,
    ConfigError,
    InputImageError,
    ManifestError,
    WeightsError,
)
from breastfusion.experiment import run_experiment
from breastfusion.files import sha256_file
from breastfusion.ingest.folder import ingest_folder, write_ingest
from breastfusion.ingest.pixels import read_pixels
from breastfusion.predict.bundle import export_bundle, load_bundle
from breastfusion.preprocess.pipeline import Preprocessor
from breastfusion.records import ImageRecord, Manifest, read_manifest, write_manifest
from breastfusion.vocab import MG_SLOTS, Label, Modality, Side

from conftest import tiny_model_config, write_tiny_cohort
from dicom_files import DBT_SOP, PHI_MARKERS, write_dicom

ROOT = Path(__file__).resolve().parents[1]
HEADER = "patient_id,side,modality,view,kind,path,label,group"


# -- the table's vocabulary ------------------------------------------------------------------------


@dataclass(frozen=True)
class Trial:
    """A built bad input: `action` feeds it to the stage; `subject` is what the message (or the
    skipped list) must name: a path, a file name, a config key or a manifest line."""

    action: Callable[[], Any]
    subject: str
    path: Path | None = None  # the bad file itself, where there is one


class Expect:
    def check(self, trial: Trial) -> None:
        raise NotImplementedError


def _names(message: str, subject: str, reason: str, one_line: bool = True) -> None:
    """The message names the subject and the reason on one of its lines, without a traceback."""
    assert "Traceback" not in message, message
    if one_line:
        assert "\n" not in message, message
    lines = message.splitlines()
    assert any(subject in line and reason in line for line in lines), (
        f"no line names {subject!r} and {reason!r}:\n{message}")


@dataclass(frozen=True)
class Raises(Expect):
    """The stage raises `error` (the project's own type); its message names the subject and reason."""

    error: type[BreastFusionError]
    reason: str

    def check(self, trial: Trial) -> None:
        with pytest.raises(self.error) as info:
            trial.action()
        # a ManifestError lists every problem, one line each; every other error is one line
        _names(str(info.value), trial.subject, self.reason, one_line=self.error is not ManifestError)


@dataclass(frozen=True)
class CliError(Expect):
    """The command prints one `error: ...` naming the subject and the reason and exits 3 (an input
    error, errors.ExitCode), no traceback."""

    reason: str

    def check(self, trial: Trial) -> None:
        result: Result = trial.action()
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception  # escaped the CLI's error handling: a traceback for the user
        out = result.output
        assert result.exit_code == 3, out
        assert "Traceback" not in out
        lines = out.splitlines()
        errors = [k for k, line in enumerate(lines) if line.startswith("error: ")]
        assert len(errors) == 1, out
        _names("\n".join(lines[errors[0]:]), trial.subject, self.reason, one_line=False)


@dataclass(frozen=True)
class Skipped(Expect):
    """Ingest skips the file (subject: its path under the root) with the reason in the summary and in
    skipped.csv, and keeps the rest of the archive (patient GOOD). With `read`, the pixel reader
    itself refuses the file with an InputImageError "<path>: <reason>"."""

    reason: str
    read: bool = False

    def check(self, trial: Trial) -> None:
        result, skipped_csv = trial.action()
        assert [rel for rel, _ in result.skipped] == [trial.subject], result.skipped
        why = result.skipped[0][1]
        assert self.reason in why and "\n" not in why, why
        assert not [m for m in PHI_MARKERS if m in why]  # reasons never quote identifying tag values
        assert "GOOD" in {r.patient_id for r in result.records}  # the good file went through
        with open(skipped_csv, newline="", encoding="utf-8") as fh:
            assert list(csv.reader(fh)) == [["path", "reason"], [trial.subject, why]]
        assert "skipped: 1" in result.summary()
        if self.read:
            with pytest.raises(InputImageError) as info:
                read_pixels(trial.path)
            message = str(info.value)
            assert message.startswith(f"{trial.path}: ") and self.reason in message, message
            assert "\n" not in message


@dataclass(frozen=True)
class Behaves(Expect):
    """A documented fallback or acceptance; `verify(trial)` runs the action and asserts it."""

    verify: Callable[[Trial], None]

    def check(self, trial: Trial) -> None:
        self.verify(trial)


@dataclass
class Env:
    tmp: Path
    shared: Shared


@dataclass(frozen=True)
class Case:
    id: str
    stage: str  # ingest | labels | manifest | preprocessing | training | config | export | bundle | predict | cli
    build: Callable[[Env], Trial]
    expect: Expect
    behaviour: str  # the documented behaviour, one line (the docs/reliability.md table)
    bug: str | None = None  # set: the case is a strict xfail, this is the bug
    raises: type[BaseException] | None = None  # the raw exception the bug lets out


# -- generated inputs ------------------------------------------------------------------------------


def noise8(shape=(32, 32), seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


def grey16(shape=(32, 32), seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) * 4000).astype(np.uint16)


def doppler(seed=0) -> np.ndarray:
    rgb = np.stack([noise8((32, 32), seed)] * 3, axis=-1)
    rgb[4:20, 4:20] = (255, 0, 0)  # a colour-flow patch
    return rgb


def save_png(path: Path, pixels: np.ndarray | None = None) -> Path:
    """A PNG file at `path`, whatever its extension says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noise8() if pixels is None else pixels).save(path, format="PNG")
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A PNG of a few bytes whose header claims width x height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.parent.mkdir(parents=True, exist_ok=True)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def with_transfer_syntax(path: Path, uid: str) -> Path:
    """Rewrite a DICOM file's meta header to claim transfer syntax `uid`; the pixel data stays raw."""
    raw = path.read_bytes()
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    group_length = int.from_bytes(raw[140:144], "little")  # (0002,0000) UL, explicit VR little endian
    meta.TransferSyntaxUID = uid
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    path.write_bytes(raw[:132] + buf.getvalue() + raw[144 + group_length:])
    return path


def mg_dicom(path: Path, pixels: np.ndarray | None = None, patient: str = "BAD", **tags) -> Path:
    tags = {"ImageLaterality": "L", "ViewPosition": "CC", **tags}
    return write_dicom(path, grey16() if pixels is None else pixels, patient=patient, **tags)


def tiny_row(name: str, modalities, cache: Path, folds: int = 3) -> RunConfig:
    model = tiny_model_config(modalities=list(modalities),
                              backbone=BackboneConfig(name="resnet18", weights="none", frozen="all", image_size=32))
    train = TrainConfig(mode="cached", epochs=1, batch_size=8, feature_copies=0, cache_dir=str(cache))
    return RunConfig(name=name, model=model, train=train, cv=CVConfig(folds=folds, test_folds=1))


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def cli(*args) -> Callable[[], Result]:
    return lambda: CliRunner().invoke(main, [str(a) for a in args])


# -- shared runs (built once per module, only when a case needs them) -------------------------------


class Shared:
    def __init__(self, root: Path):
        self.root = root

    @cached_property
    def trained(self) -> tuple[Path, Path]:
        """A cross-validated MM row (3 folds, cached features) and its exported bundle."""
        tmp = self.root / "trained"
        manifest = read_manifest(write_tiny_cohort(tmp / "data", n_cases=9))
        run_experiment(manifest, [tiny_row("MM", ["MG", "US"], tmp / "cache")], tmp / "run", progress=False)
        row_dir = tmp / "run" / "rows" / "MM"
        return row_dir, export_bundle(row_dir, tmp / "bundle")

    @cached_property
    def bad_run(self) -> tuple[dict, Path, dict[str, str]]:
        """An MM experiment on a cohort with every kind of bad case the training stage must survive."""
        tmp = self.root / "bad-run"
        records = list(read_manifest(write_tiny_cohort(tmp / "data", n_cases=9)).records)
        img = tmp / "data" / "img"
        paths = {
            "truncated US": str(truncate(img / "P000_US0.png").resolve()),
            "doppler US": str(save_png(img / "P001_US0.png", doppler()).resolve()),
        }
        for slot in MG_SLOTS:
            truncate(img / f"P002_{slot.name}.png")  # every MG view of P002 unreadable
            save_png(img / f"P003_{slot.name}.png", np.zeros((32, 32), np.uint8))  # all-black mammograms
        for k in range(2):  # a breast with ultrasound only
            path = save_png(img / f"NOMG_US{k}.png", noise8(seed=10 + k))
            records.append(ImageRecord("NOMG", Side.LEFT, Modality.US, str(path), label=Label.NORMAL))
        for k, slot in enumerate(MG_SLOTS):  # a breast with mammograms only
            path = save_png(img / f"NOUS_{slot.name}.png", noise8(seed=20 + k))
            records.append(ImageRecord("NOUS", Side.LEFT, Modality.MG, str(path), slot.view, slot.kind,
                                       Label.BENIGN))
        manifest = read_manifest(write_manifest(records, tmp / "data" / "manifest.csv"))
        metrics = run_experiment(manifest, [tiny_row("MM", ["MG", "US"], tmp / "cache")], tmp / "run",
                                 progress=False)
        return metrics, tmp / "run" / "rows" / "MM", paths

    @cached_property
    def predicted(self) -> tuple[Result, Path]:
        """`breastfusion predict` on a folder: two good patients, one with only bad files, one whose
        only US image is colour Doppler, one without US."""
        _, bundle = self.trained
        study = self.root / "study"
        for seed, pid in enumerate(("GOOD1", "GOOD2")):
            save_png(study / pid / "L" / "MG" / "CC.png", noise8(seed=seed))
            save_png(study / pid / "L" / "MG" / "MLO.png", noise8(seed=seed + 10))
            save_png(study / pid / "L" / "US" / "scan.png", noise8(seed=seed + 20))
        (study / "BAD" / "L" / "MG").mkdir(parents=True)
        (study / "BAD" / "L" / "MG" / "CC.png").write_bytes(b"")
        (study / "BAD" / "L" / "US").mkdir(parents=True)
        (study / "BAD" / "L" / "US" / "scan.png").write_text("not an image\n")
        save_png(study / "DOP" / "R" / "MG" / "CC.png", noise8(seed=30))
        save_png(study / "DOP" / "R" / "MG" / "MLO.png", noise8(seed=31))
        save_png(study / "DOP" / "R" / "US" / "doppler.png", doppler())
        save_png(study / "NOUS" / "L" / "MG" / "CC.png", noise8(seed=40))
        save_png(study / "NOUS" / "L" / "MG" / "MLO.png", noise8(seed=41))
        out = self.root / "predicted"
        result = cli("predict", study, "--model", bundle, "-o", out, "--no-heatmaps",
                     "--cache-dir", self.root / "predict-cache")()
        assert result.exit_code == 4, result.output  # outputs written, some patients not predicted
        assert "not every input was used" in result.output
        return result, out


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    return Shared(tmp_path_factory.mktemp("shared"))


# -- ingest ----------------------------------------------------------------------------------------


def _ingest(root: Path, out: Path, labels: Path | None = None):
    result = ingest_folder(root, labels_csv=labels)
    _, skipped = write_ingest(result, out / "manifest.csv")
    return result, skipped


def archive(write: Callable[[Path], str]) -> Callable[[Env], Trial]:
    """An archive with one good DICOM (patient GOOD) and what `write` puts beside it (its path under
    the root, which is the subject)."""

    def build(env: Env) -> Trial:
        root = env.tmp / "archive"
        mg_dicom(root / "good.dcm", patient="GOOD")
        rel = write(root)
        return Trial(lambda: _ingest(root, env.tmp / "out"), rel, root / rel)

    return build


def _at(root: Path, rel: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _zero_byte(root: Path) -> str:
    _at(root, "P1/L/US/scan.png").write_bytes(b"")
    return "P1/L/US/scan.png"


def _truncated_png(root: Path) -> str:
    truncate(save_png(_at(root, "P1/L/US/scan.png")))
    return "P1/L/US/scan.png"


def _truncated_dicom(root: Path) -> str:
    truncate(mg_dicom(root / "cut.dcm", grey16((64, 64))), keep=0.6)  # cut inside the pixel data
    return "cut.dcm"


def _truncated_dicom_header(root: Path) -> str:
    path = mg_dicom(root / "cut.dcm")
    path.write_bytes(path.read_bytes()[:200])  # preamble, DICM and part of the file meta
    return "cut.dcm"


def _text_as_png(root: Path) -> str:
    _at(root, "P1/L/US/scan.png").write_text("this is not an image\n")
    return "P1/L/US/scan.png"


def _png_named_dcm(root: Path) -> str:
    save_png(_at(root, "P1/L/US/scan.dcm"))
    return "P1/L/US/scan.dcm"


def _no_pixel_data(root: Path) -> str:
    write_dicom(root / "header.dcm", None, patient="BAD", ImageLaterality="L", ViewPosition="CC")
    return "header.dcm"


def _unconvertible_modality(root: Path) -> str:
    """A DICOM whose Modality element carries an invalid VR ('BS'), which pydicom cannot convert."""
    path = mg_dicom(root / "bad-vr.dcm", ImageLaterality="L", ViewPosition="CC")
    raw = path.read_bytes()
    at = raw.index(b"\x08\x00\x60\x00CS")  # (0008,0060) Modality, explicit VR little endian
    path.write_bytes(raw[:at + 4] + b"BS" + raw[at + 6:])
    return "bad-vr.dcm"


def _verify_unconvertible_modality(trial: Trial) -> None:
    _, record = _ingested("BAD")(trial)
    assert record.modality is Modality.MG  # the element reads as missing; the SOP class says MG


def _multi_frame(root: Path) -> str:
    mg_dicom(root / "volume.dcm", grey16((3, 32, 32)), NumberOfFrames=3)
    return "volume.dcm"


def _dbt_volume(root: Path) -> str:
    mg_dicom(root / "dbt.dcm", sop_class=DBT_SOP)
    return "dbt.dcm"


def _tomo_slice(root: Path) -> str:
    mg_dicom(root / "slice.dcm", ImageType=["DERIVED", "PRIMARY", "TOMO"])
    return "slice.dcm"


def _for_processing(root: Path) -> str:
    mg_dicom(root / "raw.dcm", PresentationIntentType="FOR PROCESSING")
    return "raw.dcm"


def _transfer_syntax(uid: str) -> Callable[[Path], str]:
    def write(root: Path) -> str:
        with_transfer_syntax(mg_dicom(root / "ts.dcm"), uid)
        return "ts.dcm"

    return write


def _bits_stored_over_allocated(root: Path) -> str:
    path = mg_dicom(root / "bits.dcm")
    ds = pydicom.dcmread(path)
    ds.BitsStored, ds.HighBit = 17, 16  # 17 of 16 allocated bits
    ds.save_as(path)
    return "bits.dcm"


def _huge_png(root: Path) -> str:
    png_claiming_size(_at(root, "P1/L/US/bomb.png"), 60000, 60000)
    return "P1/L/US/bomb.png"


def _huge_dicom(root: Path) -> str:
    mg_dicom(root / "huge.dcm", np.zeros((4, 4), np.uint16), Rows=60000, Columns=60000)
    return "huge.dcm"


def _unknown_laterality(root: Path) -> str:
    write_dicom(root / "nolat.dcm", grey16(), patient="BAD", ViewPosition="CC")
    return "nolat.dcm"


def _conflicting_laterality(root: Path) -> str:
    mg_dicom(root / "conflict.dcm", ImageLaterality="L", SeriesDescription="R CC")
    return "conflict.dcm"


def _duplicate_uid(root: Path) -> str:
    for name in ("a.dcm", "b.dcm"):
        mg_dicom(root / name, patient="DUP", uid="1.2.826.0.1.3680043.99.77", ImageLaterality="R",
                 ViewPosition="MLO")
    return "b.dcm"


def _ct(root: Path) -> str:
    write_dicom(root / "ct.dcm", grey16(), sop_class="1.2.840.10008.5.1.4.1.1.2", modality="CT",
                patient="BAD", ImageLaterality="L")
    return "ct.dcm"


def _no_patient_id(root: Path) -> str:
    mg_dicom(root / "anon.dcm", patient="")
    return "anon.dcm"


def _loose_png(root: Path) -> str:
    save_png(root / "loose.png")
    return "loose.png"


def _sidecar(text: str) -> Callable[[Path], str]:
    def write(root: Path) -> str:
        save_png(root / "scan.png")
        (root / "scan.json").write_text(text)
        return "scan.png"

    return write


def _mg_name_without_view(root: Path) -> str:
    save_png(_at(root, "P1/L/MG/image.png"))
    return "P1/L/MG/image.png"


def _ingested(rel_patient: str) -> Callable[[Trial], tuple]:
    """Run the ingest trial; assert nothing was skipped and the subject file is a record."""

    def run(trial: Trial):
        result, _ = trial.action()
        assert result.skipped == []
        (record,) = [r for r in result.records if Path(r.path).resolve() == trial.path.resolve()]
        assert record.patient_id == rel_patient
        return result, record

    return run


def _verify_png_named_dcm(trial: Trial) -> None:
    _, record = _ingested("P1")(trial)
    assert record.modality is Modality.US and record.side is Side.LEFT
    assert read_pixels(trial.path).shape == (32, 32)  # read as the PNG it is


def _monochrome1(root: Path) -> str:
    ramp = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)
    mg_dicom(root / "mono1.dcm", ramp, patient="M1", photometric="MONOCHROME1")
    return "mono1.dcm"


def _verify_monochrome1(trial: Trial) -> None:
    _ingested("M1")(trial)
    img = read_pixels(trial.path)
    assert img[0, 0] == pytest.approx(1.0) and img[-1, -1] == pytest.approx(0.0)  # stored 0 is bright
    assert np.all(np.diff(img.ravel()) < 0)


ODD_BITS = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 1024  # 10 bits: 0..1023


def _odd_bits_stored(root: Path) -> str:
    garbage = np.random.default_rng(3).integers(0, 64, ODD_BITS.shape).astype(np.uint16) << 10
    mg_dicom(root / "bits10.dcm", ODD_BITS | garbage, patient="B10", BitsStored=10)
    return "bits10.dcm"


def _verify_odd_bits_stored(trial: Trial) -> None:
    _ingested("B10")(trial)
    img = read_pixels(trial.path)  # the 6 high bits hold garbage: ignored
    np.testing.assert_allclose(img, ODD_BITS / 1023.0, atol=1e-6)


INGEST = [
    Case("zero-byte-file", "ingest", archive(_zero_byte), Skipped("zero-byte file", read=True),
         "skipped: `zero-byte file`"),
    Case("truncated-png", "ingest", archive(_truncated_png), Skipped("truncated or corrupt image file", read=True),
         "skipped: `truncated or corrupt image file (...)`"),
    Case("truncated-dicom-pixel-data", "ingest", archive(_truncated_dicom),
         Skipped("cannot decode pixel data", read=True), "skipped: `cannot decode pixel data (...)`"),
    Case("truncated-dicom-header", "ingest", archive(_truncated_dicom_header),
         Skipped("DICOM without pixel data", read=True), "skipped: `DICOM without pixel data`"),
    Case("text-file-named-png", "ingest", archive(_text_as_png), Skipped("not an image or DICOM file", read=True),
         "skipped: `not an image or DICOM file`"),
    Case("png-named-dcm", "ingest", archive(_png_named_dcm), Behaves(_verify_png_named_dcm),
         "accepted: the format is read from the content, not the extension"),
    Case("dicom-without-pixel-data", "ingest", archive(_no_pixel_data),
         Skipped("DICOM without pixel data", read=True), "skipped: `DICOM without pixel data`"),
    Case("unconvertible-modality-element", "ingest", archive(_unconvertible_modality),
         Behaves(_verify_unconvertible_modality),
         "accepted: an element pydicom cannot convert reads as missing (here Modality: MG from the SOP class)"),
    Case("multi-frame-dicom", "ingest", archive(_multi_frame), Skipped("multi-frame object (3 frames)", read=True),
         "skipped: `multi-frame object (3 frames): DBT volumes and cine loops are not used`"),
    Case("dbt-volume-sop-class", "ingest", archive(_dbt_volume),
         Skipped("breast tomosynthesis volume: DBT volumes and projections are not used"),
         "skipped: `breast tomosynthesis volume: DBT volumes and projections are not used`"),
    Case("tomosynthesis-slice", "ingest", archive(_tomo_slice), Skipped("tomosynthesis slice or projection"),
         "skipped: `tomosynthesis slice or projection (...)`"),
    Case("for-processing-image", "ingest", archive(_for_processing), Skipped("FOR PROCESSING image"),
         "skipped: `FOR PROCESSING image (raw detector data): ...`"),
    Case("unknown-transfer-syntax", "ingest", archive(_transfer_syntax("1.2.3.4.5.6.7")),
         Skipped("unknown transfer syntax 1.2.3.4.5.6.7", read=True), "skipped: `unknown transfer syntax <uid>`"),
    Case("jpeg-transfer-syntax-raw-pixels", "ingest", archive(_transfer_syntax("1.2.840.10008.1.2.4.50")),
         Skipped("cannot decode pixel data", read=True),
         "skipped: `cannot decode pixel data (...)` (JPEG claimed, raw pixels stored)"),
    Case("unsupported-transfer-syntax", "ingest", archive(_transfer_syntax("1.2.840.10008.1.2.4.100")),
         Skipped("unsupported transfer syntax MPEG2", read=True),
         "skipped: `unsupported transfer syntax MPEG2 ... (<uid>)`"),
    Case("monochrome1", "ingest", archive(_monochrome1), Behaves(_verify_monochrome1),
         "accepted, inverted (stored 0 reads as 1.0, bright)"),
    Case("odd-bits-stored", "ingest", archive(_odd_bits_stored), Behaves(_verify_odd_bits_stored),
         "accepted: 10 of 16 bits stored, garbage in the high bits ignored, scaled to [0, 1]"),
    Case("bits-stored-over-allocated", "ingest", archive(_bits_stored_over_allocated),
         Skipped("cannot decode pixel data", read=True), "skipped: `cannot decode pixel data (... Bits Stored ...)`"),
    Case("huge-png-header", "ingest", archive(_huge_png), Skipped("image too large", read=True),
         "skipped before decoding: `image too large (...)` (a 60000 x 60000 PNG header in 100 bytes)"),
    Case("huge-dicom-dimensions", "ingest", archive(_huge_dicom),
         Skipped("image too large (60000 x 60000 pixels", read=True),
         "skipped before decoding: `image too large (60000 x 60000 pixels; limits ...)`"),
    Case("unknown-laterality", "ingest", archive(_unknown_laterality), Skipped("unknown laterality"),
         "skipped: `unknown laterality`"),
    Case("conflicting-laterality", "ingest", archive(_conflicting_laterality), Skipped("conflicting laterality"),
         "skipped: `conflicting laterality` (ImageLaterality L, series description R CC)"),
    Case("duplicate-sop-instance-uid", "ingest", archive(_duplicate_uid),
         Skipped("duplicate SOPInstanceUID (same image as a.dcm)"),
         "second file skipped: `duplicate SOPInstanceUID (same image as <first>)`; the first is kept"),
    Case("non-breast-modality", "ingest", archive(_ct), Skipped("modality CT is not MG, US or a breast DX/CR"),
         "skipped: `modality CT is not MG, US or a breast DX/CR`"),
    Case("no-patient-id", "ingest", archive(_no_patient_id), Skipped("no PatientID"), "skipped: `no PatientID`"),
    Case("image-without-sidecar-or-layout", "ingest", archive(_loose_png),
         Skipped("image file without sidecar JSON or folder layout"),
         "skipped: `image file without sidecar JSON or folder layout (...)`"),
    Case("sidecar-not-json", "ingest", archive(_sidecar("{not json")), Skipped("bad sidecar JSON (scan.json: "),
         "skipped: `bad sidecar JSON (<name>.json: <parser message>)`"),
    Case("sidecar-unknown-side", "ingest",
         archive(_sidecar('{"patient_id": "P9", "side": "Q", "modality": "US"}')),
         Skipped("bad sidecar JSON (scan.json: unknown side 'Q'"),
         "skipped: `bad sidecar JSON (... unknown side 'Q' ...)`"),
    Case("mg-file-name-without-view", "ingest", archive(_mg_name_without_view),
         Skipped("MG file name names no single view"), "skipped: `MG file name names no single view (CC or MLO)`"),
]


# -- labels CSV ------------------------------------------------------------------------------------


def labels(text: str | bytes, run: str = "api") -> Callable[[Env], Trial]:
    """An archive (patient GOOD, left breast) and a labels CSV beside it."""

    def build(env: Env) -> Trial:
        root = env.tmp / "archive"
        mg_dicom(root / "good.dcm", patient="GOOD")
        path = env.tmp / "labels.csv"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        if run == "cli":
            return Trial(cli("ingest", root, "-o", env.tmp / "out" / "m.csv", "--labels", path), "labels.csv line 3")
        subject = str(path) if run == "api-file" else "labels.csv line 2"
        return Trial(lambda: _ingest(root, env.tmp / "out", labels=path), subject, path)

    return build


def _verify_label_for_nobody(trial: Trial) -> None:
    result, _ = trial.action()
    assert result.problems == ["labels.csv line 3: no ingested image for this patient"]
    assert "problems: 1" in result.summary()
    assert [r.label for r in result.records] == [Label.BENIGN]  # the other label was applied


LABELS = [
    Case("labels-two-labels-one-breast", "labels",
         labels("patient_id,side,label\nGOOD,L,normal\nGOOD,L,benign\n", run="cli"),
         CliError("label benign differs from line 2 (normal) for the same breast"),
         "`breastfusion ingest --labels`: exit 3, `error: <labels>: 1 problem(s)` then "
         "`labels.csv line 3: label benign differs from line 2 (normal) for the same breast`"),
    Case("labels-unknown-label", "labels", labels("patient_id,side,label\nGOOD,L,cancer\n"),
         Raises(ManifestError, "unknown label 'cancer'"), "ManifestError: `labels.csv line 2: unknown label 'cancer'`"),
    Case("labels-missing-column", "labels", labels("patient_id,side\nGOOD,L\n", run="api-file"),
         Raises(ManifestError, "missing column(s) label"), "ManifestError: `<labels>: missing column(s) label`"),
    Case("labels-row-for-no-image", "labels", labels("patient_id,side,label\nGOOD,L,benign\nNOBODY,,normal\n"),
         Behaves(_verify_label_for_nobody),
         "accepted: `labels.csv line 3: no ingested image for this patient` in the problems and the summary"),
    Case("labels-not-utf8", "labels", labels("patient_id,side,label\nGOOD,L,b\xe9nin\n".encode("latin-1"),
                                             run="api-file"),
         Raises(ManifestError, "UTF-8"), "ManifestError naming the file: not UTF-8"),
]


# -- manifest --------------------------------------------------------------------------------------


def manifest(*lines: str, header: str | None = HEADER, subject: str = "m.csv line 2", data_root: bool = False,
             encoding: str = "utf-8") -> Callable[[Env], Trial]:
    """data/m.csv with these lines (images data/a.png and data/b.png exist); read_manifest on it.
    `subject` may name {data} (the data folder) or {tmp} (the test folder)."""

    def build(env: Env) -> Trial:
        data = env.tmp.resolve() / "data"
        save_png(data / "a.png")
        save_png(data / "b.png", noise8(seed=1))
        save_png(env.tmp.resolve() / "outside" / "x.png")
        (data / "link.png").symlink_to(env.tmp.resolve() / "outside" / "x.png")
        path = data / "m.csv"
        text = "" if header is None else "\n".join([header, *lines]) + "\n"
        path.write_bytes(text.encode(encoding))
        root = data if data_root else None
        return Trial(lambda: read_manifest(path, data_root=root),
                     subject.format(data=data, tmp=env.tmp.resolve(), manifest=path), path)

    return build


def manifest_cli(*lines: str, args: tuple[str, ...] = (), subject: str) -> Callable[[Env], Trial]:
    """`breastfusion validate` on the manifest that `manifest(*lines)` writes."""

    def build(env: Env) -> Trial:
        trial = manifest(*lines, subject=subject)(env)
        extra = [a.format(data=trial.path.parent) for a in args]
        return Trial(cli("validate", trial.path, *extra), trial.subject, trial.path)

    return build


def _verify_every_problem_listed(trial: Trial) -> None:
    with pytest.raises(ManifestError) as info:
        trial.action()
    lines = str(info.value).splitlines()
    assert lines[0] == f"{trial.path}: 3 problem(s)"
    assert any("m.csv line 2: unknown label 'cancer'" in line for line in lines)
    assert any("m.csv line 3: unknown side 'X'" in line for line in lines)
    assert any("file not found" in line and "missing.png" in line for line in lines)


MANIFEST = [
    Case("manifest-two-labels-one-case", "manifest",
         manifest("P1,L,US,,,a.png,normal,", "P1,L,US,,,b.png,benign,", subject="P1:L"),
         Raises(ManifestError, "case has two labels (benign, normal)"),
         "ManifestError: `P1:L: case has two labels (benign, normal)` (names the case, not the lines)"),
    Case("manifest-same-file-two-patients", "manifest",
         manifest("P1,L,US,,,a.png,normal,", "P2,L,US,,,a.png,normal,", subject="P2:L a.png"),
         Raises(ManifestError, "file already listed for P1:L"),
         "ManifestError: `P2:L a.png: file already listed for P1:L`"),
    Case("manifest-missing-file", "manifest", manifest("P1,L,US,,,missing.png,normal,", subject="{data}/missing.png"),
         Raises(ManifestError, "file not found"), "ManifestError: `P1:L missing.png: file not found: <path>`"),
    Case("manifest-path-escapes-data-root", "manifest",
         manifest_cli("P1,L,US,,,../outside/x.png,normal,", args=("--data-root", "{data}"),
                      subject="{tmp}/outside/x.png"),
         CliError("lies outside the data root"),
         "`breastfusion validate --data-root`: exit 3, `m.csv: <path> lies outside the data root <root>`"),
    Case("manifest-symlink-escapes-data-root", "manifest",
         manifest("P1,L,US,,,link.png,normal,", data_root=True, subject="{tmp}/outside/x.png"),
         Raises(ManifestError, "lies outside the data root"),
         "ManifestError: a link is followed, then `<target> lies outside the data root <root>`"),
    Case("manifest-unknown-label", "manifest", manifest("P1,L,US,,,a.png,cancer,"),
         Raises(ManifestError, "unknown label 'cancer'"),
         "ManifestError: `m.csv line 2: unknown label 'cancer' (...)`"),
    Case("manifest-unknown-side", "manifest", manifest("P1,X,US,,,a.png,normal,"),
         Raises(ManifestError, "unknown side 'X'"), "ManifestError: `m.csv line 2: unknown side 'X' (...)`"),
    Case("manifest-unknown-modality", "manifest", manifest("P1,L,CT,,,a.png,normal,"),
         Raises(ManifestError, "unknown modality 'CT'"), "ManifestError: `m.csv line 2: unknown modality 'CT' (...)`"),
    Case("manifest-mg-without-view", "manifest", manifest("P1,L,MG,,2D,a.png,normal,", subject="P1:L a.png"),
         Raises(ManifestError, "MG image without a view"),
         "ManifestError: `P1:L a.png: MG image without a view (CC, MLO or OTHER)`"),
    Case("manifest-missing-column", "manifest",
         manifest("P1,L,US,a.png,normal", header="patient_id,side,modality,label_path,label", subject="{manifest}"),
         Raises(ManifestError, "missing column(s) path"), "ManifestError: `<manifest>: missing column(s) path`"),
    Case("manifest-empty-file", "manifest", manifest(header=None, subject="{manifest}"),
         Raises(ManifestError, "missing column(s) patient_id, side, modality, path"),
         "ManifestError: `<manifest>: missing column(s) patient_id, side, modality, path`"),
    Case("manifest-several-bad-lines", "manifest",
         manifest("P1,L,US,,,a.png,cancer,", "P2,X,US,,,b.png,normal,", "P3,L,US,,,missing.png,normal,"),
         Behaves(_verify_every_problem_listed), "ManifestError listing every problem, one line each (3 here)"),
    Case("manifest-case-without-label", "manifest",
         manifest_cli("P1,L,US,,,a.png,,", subject="P1:L a.png"), CliError("no label"),
         "`breastfusion validate`: exit 3, `P1:L a.png: no label`"),
    Case("manifest-not-utf8", "manifest", manifest("P\xe9,L,US,,,a.png,normal,", encoding="latin-1",
                                                   subject="{manifest}"),
         Raises(ManifestError, "not UTF-8 text"),
         "ManifestError: `<manifest>: not UTF-8 text (byte N); save the CSV as UTF-8`"),
    Case("manifest-oversized-field", "manifest",
         manifest("P1,L,US,,," + "a" * 200_000 + ",normal,", subject="{manifest}"),
         Raises(ManifestError, "not a readable CSV near line"),
         "ManifestError: `<manifest>: not a readable CSV near line N (field larger than field limit ...)`"),
]


def _manifest_not_found(env: Env) -> Trial:
    path = env.tmp / "nowhere.csv"
    return Trial(lambda: read_manifest(path), str(path), path)


MANIFEST.append(Case("manifest-not-found", "manifest", _manifest_not_found,
                     Raises(ManifestError, "manifest not found"), "ManifestError: `<path>: manifest not found`"))


# -- preprocessing ---------------------------------------------------------------------------------


def preprocess(pixels: Callable[[], np.ndarray], modality: str, colour: str = "reject",
               name: str = "img.png") -> Callable[[Env], Trial]:
    def build(env: Env) -> Trial:
        path = env.tmp / name
        if name.endswith(".tif"):
            Image.fromarray(pixels()).save(path)
        else:
            save_png(path, pixels())
        return Trial(lambda: Preprocessor(size=32, colour=colour).process_info(path, modality, "L"), str(path), path)

    return build


def fallback(reason: str, value: float | None = None) -> Behaves:
    def verify(trial: Trial) -> None:
        img, info = trial.action()
        assert img.shape == (32, 32) and img.dtype == np.float32 and np.isfinite(img).all()
        assert info.fallback and info.reason == reason and "fallback" in info.flags, info
        assert info.bbox == (0, 0, *info.shape)  # the whole image was kept
        if value is not None:
            assert np.all(img == value)

    return Behaves(verify)


def _verify_greyed(trial: Trial) -> None:
    img, info = trial.action()
    assert img.shape == (32, 32) and img.ndim == 2 and 0 <= img.min() and img.max() <= 1
    assert "colour_greyed" in info.flags and info.colour_fraction > 0.001


def _nan_inf_pixels() -> np.ndarray:
    arr = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    arr[0, 0], arr[1, 1], arr[2, 2] = np.nan, np.inf, -np.inf
    return arr


def _verify_finite(trial: Trial) -> None:
    img, _ = trial.action()
    assert img.shape == (32, 32) and np.isfinite(img).all() and 0 <= img.min() and img.max() <= 1


PREPROCESSING = [
    Case("all-black-mammogram", "preprocessing", preprocess(lambda: np.zeros((64, 64), np.uint8), "MG"),
         fallback("no contrast (blank image)", 0.0),
         "whole image kept (no crop), `CropInfo.fallback`, flag `fallback`, reason `no contrast (blank image)`"),
    Case("all-white-mammogram", "preprocessing", preprocess(lambda: np.full((64, 64), 255, np.uint8), "MG"),
         fallback("no contrast (blank image)", 1.0), "as all-black: whole image kept, flagged `fallback`"),
    Case("all-black-ultrasound", "preprocessing", preprocess(lambda: np.zeros((64, 64), np.uint8), "US"),
         fallback("no contrast (blank image)", 0.0), "whole image kept, flagged `fallback` (`no contrast`)"),
    Case("one-pixel-mammogram", "preprocessing", preprocess(lambda: np.array([[9]], np.uint8), "MG"),
         fallback("no contrast (blank image)"), "whole image kept, flagged `fallback`; resized to the model's size"),
    Case("one-row-ultrasound", "preprocessing", preprocess(lambda: noise8((1, 200)), "US"),
         fallback("no speckled region found"), "whole image kept, flagged `fallback` (`no speckled region found`)"),
    Case("float-tiff-nan-inf", "preprocessing", preprocess(_nan_inf_pixels, "MG", name="img.tif"),
         Behaves(_verify_finite), "accepted: NaN and inf pixels mapped into [0, 1], output finite"),
    Case("colour-doppler-us-reject", "preprocessing", preprocess(doppler, "US"),
         Raises(InputImageError, "colour policy is reject"),
         "InputImageError: `<path>: colour image (x% coloured pixels ...); colour policy is reject`"),
    Case("colour-doppler-us-grey", "preprocessing", preprocess(doppler, "US", colour="grey"),
         Behaves(_verify_greyed), "colour policy `grey`: converted to luminance, flagged `colour_greyed`"),
]


# -- training --------------------------------------------------------------------------------------


def bad_run(verify: Callable[[dict, Path, dict[str, str]], None]) -> tuple[Callable[[Env], Trial], Behaves]:
    """The shared MM experiment on the bad cohort; `verify(metrics, row_dir, paths)`."""

    def build(env: Env) -> Trial:
        return Trial(lambda: env.shared.bad_run, "MM")

    return build, Behaves(lambda trial: verify(*trial.action()))


def _validated(row_dir: Path) -> set[str]:
    return set(pd.read_csv(row_dir / "predictions_patients.csv")["case_id"])


def _run_completed(metrics: dict, row_dir: Path) -> None:
    row = metrics["rows"][0]
    assert "not_run" not in row and sum(map(sum, row["patient"]["confusion"])) == 8  # 9 good cases, P002 lost
    assert _validated(row_dir) == {f"P00{k}:L" for k in range(9) if k != 2}


def _no_mg(metrics, row_dir, paths) -> None:
    _run_completed(metrics, row_dir)
    assert metrics["rows"][0]["excluded"]["no MG image in the model's views"] == 1
    assert "NOMG:L" not in _validated(row_dir)


def _no_us(metrics, row_dir, paths) -> None:
    _run_completed(metrics, row_dir)
    assert metrics["rows"][0]["excluded"]["no US image"] == 1
    assert "NOUS:L" not in _validated(row_dir)


def _refused_us(key: str, reason: str, case: str) -> Callable:
    def verify(metrics, row_dir, paths) -> None:
        _run_completed(metrics, row_dir)
        refused = json.loads((row_dir / "refused_images.json").read_text())
        assert refused[paths[key]].startswith(f"{paths[key]}: ") and reason in refused[paths[key]]
        assert metrics["rows"][0]["excluded"]["instance: US image refused by preprocessing"] == 2  # both US cases
        assert case in _validated(row_dir)  # the case keeps its other US image

    return verify


def _every_mg_refused(metrics, row_dir, paths) -> None:
    _run_completed(metrics, row_dir)
    refused = json.loads((row_dir / "refused_images.json").read_text())
    assert sum("P002_" in path and "truncated or corrupt" in why for path, why in refused.items()) == 4
    assert metrics["rows"][0]["excluded"]["instance: every MG image refused by preprocessing"] == 2  # 2 US images
    assert metrics["rows"][0]["refused_images"] == 6
    assert "P002:L" not in _validated(row_dir)


def _all_black_trained(metrics, row_dir, paths) -> None:
    _run_completed(metrics, row_dir)
    assert "P003:L" in _validated(row_dir)  # kept (whole-image fallback), not refused
    refused = json.loads((row_dir / "refused_images.json").read_text())
    assert not [p for p in refused if "P003_" in p]


def _features_poisoned(env: Env) -> Trial:
    def run():
        manifest_ = read_manifest(write_tiny_cohort(env.tmp / "data", n_cases=9))
        rows = [tiny_row("US", ["US"], env.tmp / "cache")]
        clean = run_experiment(manifest_, rows, env.tmp / "run", progress=False)
        files = sorted((env.tmp / "cache" / "features").rglob("*.npy"))
        np.save(files[0], np.full_like(np.load(files[0]), np.nan))
        np.save(files[1], np.full_like(np.load(files[1]), np.inf))
        for fold in (env.tmp / "run" / "rows" / "US" / "folds").iterdir():
            (fold / "predictions.csv").unlink()  # the folds train again, reading the cache
        again = run_experiment(manifest_, rows, env.tmp / "run", progress=False)
        return clean, again, files[:2]

    return Trial(run, "features")


def _verify_features_recomputed(trial: Trial) -> None:
    clean, again, files = trial.action()
    for level in ("instance", "patient", "patient_mean"):  # NaN-aware equality through JSON
        assert json.dumps(again["rows"][0][level]) == json.dumps(clean["rows"][0][level])
    for file in files:
        assert np.isfinite(np.load(file)).all()


def experiment_cli(edit: Callable[[dict], None] | None = None, *, text: str | None = None, n_cases: int = 9,
                   folds: int = 3, subject: str = "{config}") -> Callable[[Env], Trial]:
    """`breastfusion experiment CONFIG.yaml` with a tiny US row (edited by `edit`) or a YAML `text`."""

    def build(env: Env) -> Trial:
        manifest_ = write_tiny_cohort(env.tmp / "data", n_cases=n_cases)
        config = env.tmp / "rows.yaml"
        if text is not None:
            config.write_text(text)
        else:
            row = to_dict(tiny_row("tiny US", ["US"], env.tmp / "cache", folds=folds))
            if edit is not None:
                edit(row)
            config.write_text(yaml.safe_dump({"rows": [row]}))
        return Trial(cli("experiment", config, "--manifest", manifest_, "-o", env.tmp / "run", "--quiet"),
                     subject.format(config=config))

    return build


def set_key(dotted: str, value) -> Callable[[dict], None]:
    def edit(row: dict) -> None:
        *parents, last = dotted.split(".")
        node = row
        for key in parents:
            node = node[key]
        node[last] = value

    return edit


def _all_rows_not_run(env: Env) -> Trial:
    records = [r for r in read_manifest(write_tiny_cohort(env.tmp / "data", n_cases=9)).records
               if r.modality is Modality.MG]  # no US image anywhere: a US row cannot run
    row = tiny_row("US", ["US"], env.tmp / "cache")
    return Trial(lambda: run_experiment(Manifest(records), [row], env.tmp / "run", progress=False), "US",
                 env.tmp / "run")


def _verify_all_rows_not_run(trial: Trial) -> None:
    metrics = trial.action()
    assert "no case has the images this model needs" in metrics["rows"][0]["not_run"]
    assert (trial.path / "report.md").is_file()


def _weights_file_missing(env: Env) -> Trial:
    manifest_ = read_manifest(write_tiny_cohort(env.tmp / "data", n_cases=9))
    good = tiny_row("US", ["US"], env.tmp / "cache")
    missing = tiny_row("US own weights", ["US"], env.tmp / "cache")
    missing.model.backbone.weights = str(env.tmp / "no-such-weights.pth")
    return Trial(lambda: run_experiment(manifest_, [good, missing], env.tmp / "run", progress=False),
                 missing.model.backbone.weights)


def _verify_weights_row_not_run(trial: Trial) -> None:
    metrics = trial.action()
    assert "patient" in metrics["rows"][0]  # the other row ran
    assert trial.subject in metrics["rows"][1]["not_run"]


def _file_deleted_after_validation(env: Env) -> Trial:
    manifest_ = read_manifest(write_tiny_cohort(env.tmp / "data", n_cases=9))
    gone = next(r.path for r in manifest_.records if r.modality is Modality.US)
    Path(gone).unlink()  # e.g. a network share that went away between validation and training
    row = tiny_row("US", ["US"], env.tmp / "cache")
    return Trial(lambda: run_experiment(manifest_, [row], env.tmp / "run", progress=False), gone,
                 env.tmp / "run" / "rows" / "US")


def _verify_deleted_file_refused(trial: Trial) -> None:
    metrics = trial.action()
    refused = json.loads((trial.path / "refused_images.json").read_text())
    assert "file not found" in refused[trial.subject]
    assert metrics["rows"][0]["excluded"] == {"instance: US image refused by preprocessing": 1}


TRAINING = [
    Case("patient-without-mg", "training", *bad_run(_no_mg),
         "MM row: the case is excluded, counted in `excluded` (`no MG image in the model's views`); the run goes on"),
    Case("patient-without-us", "training", *bad_run(_no_us),
         "MM row: the case is excluded, counted in `excluded` (`no US image`); the run goes on"),
    Case("truncated-us-image-in-manifest", "training",
         *bad_run(_refused_us("truncated US", "truncated or corrupt image file", "P000:L")),
         "image refused, listed in `refused_images.json` with its reason; the instance is dropped and counted, "
         "the case keeps its other US image"),
    Case("doppler-us-image-in-manifest", "training",
         *bad_run(_refused_us("doppler US", "colour policy is reject", "P001:L")),
         "as above: refused (`colour policy is reject`), listed in `refused_images.json`, run goes on"),
    Case("every-mg-view-unreadable", "training", *bad_run(_every_mg_refused),
         "4 views refused and listed; the case's instances are counted "
         "(`instance: every MG image refused by preprocessing`); the others go on"),
    Case("all-black-mammograms-in-manifest", "training", *bad_run(_all_black_trained),
         "accepted with the whole-image fallback; the case is trained and validated (the flag is not reported)"),
    Case("nan-inf-cached-features", "training", _features_poisoned, Behaves(_verify_features_recomputed),
         "NaN / inf feature files in the cache are recomputed, never trained on; metrics identical"),
    Case("fewer-patients-than-folds", "training", experiment_cli(n_cases=2, subject="2 patient groups"),
         CliError("cannot fill 3 folds"),
         "`breastfusion experiment`: exit 3, `2 patient groups cannot fill 3 folds; use fewer folds or more data`"),
    Case("too-few-cases-per-class", "training", experiment_cli(n_cases=4, subject="folds"), CliError(""),
         "BreastFusionError naming the folds and the class counts"),
    Case("every-row-not-run", "training", _all_rows_not_run, Behaves(_verify_all_rows_not_run),
         "every row reported `not run` with its reason, report written"),
    Case("backbone-weights-file-missing", "training", _weights_file_missing, Behaves(_verify_weights_row_not_run),
         "the row is `not run` with a reason naming the file; the other rows run"),
    Case("image-deleted-after-validation", "training", _file_deleted_after_validation,
         Behaves(_verify_deleted_file_refused), "image refused (`file not found`), listed, run goes on"),
]


# -- configuration (through the CLI) ---------------------------------------------------------------


CONFIG = [
    Case("config-unknown-key", "config", experiment_cli(set_key("model.foo", 1), subject="model.foo"),
         CliError("unknown config key(s)"), "exit 3, `error: unknown config key(s) model.foo`"),
    Case("config-wrong-type", "config", experiment_cli(set_key("train.epochs", "ten"), subject="train.epochs"),
         CliError("must be int, got 'ten'"), "exit 3, `error: config key train.epochs must be int, got 'ten'`"),
    Case("config-bad-choice", "config", experiment_cli(set_key("model.fusion", "sum"), subject="fusion 'sum'"),
         CliError("not in (concat, cross_attention)"),
         "exit 3, `error: config key model.fusion 'sum' not in (concat, cross_attention)`"),
    Case("config-invalid-yaml", "config", experiment_cli(text="rows: [\n  - {name: x\n"), CliError(""),
         "exit 3 naming the file and the YAML error"),
    Case("config-not-a-mapping", "config", experiment_cli(text="- 1\n- 2\n"), CliError(""),
         "exit 3 naming the file: a row must be a mapping"),
    Case("config-float-given-as-text", "config",
         experiment_cli(set_key("train.lr", "fast"), subject="train.lr"), CliError("must be float"),
         "exit 3, `error: config key train.lr must be float, got 'fast'`"),
    Case("config-zero-batch-size", "config", experiment_cli(set_key("train.batch_size", 0), subject="batch_size"),
         CliError(""), "exit 3 naming train.batch_size"),
    Case("config-negative-feature-copies", "config",
         experiment_cli(set_key("train.feature_copies", -1), subject="feature_copies"), CliError(""),
         "exit 3 naming train.feature_copies"),
    Case("config-unknown-device", "config", experiment_cli(set_key("train.device", "tpu"), subject="tpu"),
         CliError(""), "exit 3 naming train.device"),
    Case("config-zero-image-size", "config",
         experiment_cli(set_key("model.backbone.image_size", 0), subject="image_size"), CliError(""),
         "exit 3 naming model.backbone.image_size"),
    Case("config-zero-epochs", "config", experiment_cli(set_key("train.epochs", 0), subject="train.epochs"),
         CliError(""), "exit 3 naming train.epochs"),
]


# -- export ----------------------------------------------------------------------------------------


def row_copy(mutate: Callable[[Path], str], via_cli: bool = False) -> Callable[[Env], Trial]:
    """A copy of the shared trained row; `mutate` damages it and returns the subject (a path or a key)."""

    def build(env: Env) -> Trial:
        row = copy_of(env.shared.trained[0], env.tmp / "row")
        subject = mutate(row)
        if via_cli:
            return Trial(cli("export", row, "-o", env.tmp / "bundle"), subject)
        return Trial(lambda: export_bundle(row, env.tmp / "bundle"), subject)

    return build


def _corrupt_checkpoint(row: Path) -> str:
    (row / "folds" / "fold_1" / "model.safetensors").write_bytes(b"\x00" * 40)
    return str(row / "folds" / "fold_1" / "model.safetensors")


def _wrong_shapes(row: Path) -> str:
    path = row / "folds" / "fold_0" / "model.safetensors"
    state = load_file(str(path))
    state[next(iter(state))] = torch.zeros(3)
    save_file(state, str(path))
    return str(path)


def _no_checkpoints(row: Path) -> str:
    for path in row.glob("folds/fold_*/model.safetensors"):
        path.unlink()
    return str(row)


def _no_test_predictions(row: Path) -> str:
    (row / "folds" / "fold_1" / "test_predictions.csv").unlink()
    return str(row / "folds" / "fold_1" / "test_predictions.csv")


def _corrupt_data_json(row: Path) -> str:
    (row / "data.json").write_text("{")
    return str(row / "data.json")


def _row_config_unknown_key(row: Path) -> str:
    cfg = yaml.safe_load((row / "config.yaml").read_text())
    cfg["model"]["foo"] = 1
    (row / "config.yaml").write_text(yaml.safe_dump(cfg))
    return "model.foo"


EXPORT = [
    Case("corrupt-fold-checkpoint", "export", row_copy(_corrupt_checkpoint, via_cli=True),
         CliError("not a loadable weights file"),
         "`breastfusion export`: exit 3, `<fold>/model.safetensors: not a loadable weights file (...)`"),
    Case("fold-checkpoint-wrong-shapes", "export", row_copy(_wrong_shapes), Raises(WeightsError, "do not fit"),
         "WeightsError naming the file: weights do not fit the configured network"),
    Case("no-completed-fold", "export", row_copy(_no_checkpoints),
         Raises(WeightsError, "no completed fold with saved weights"),
         "WeightsError: `<row>: no completed fold with saved weights (model.safetensors); rerun ...`"),
    Case("missing-test-predictions", "export", row_copy(_no_test_predictions), Raises(BreastFusionError, ""),
         "an error naming the missing file"),
    Case("corrupt-data-json", "export", row_copy(_corrupt_data_json), Raises(BreastFusionError, ""),
         "an error naming data.json"),
    Case("row-config-unknown-key", "export", row_copy(_row_config_unknown_key),
         Raises(ConfigError, "unknown config key(s)"),
         "ConfigError: `unknown config key(s) model.foo` (names the key, not the file)"),
]


# -- bundle ----------------------------------------------------------------------------------------


class _Smuggler:
    """Unpickling it creates a file: proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _rehash(bundle: Path, name: str) -> None:
    """Make bundle.json's checksum of `name` consistent again (an evil but consistent bundle)."""
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["sha256"][name] = sha256_file(bundle / name)
    (bundle / "bundle.json").write_text(json.dumps(meta))


def bundle_copy(mutate: Callable[[Path], str], via_cli: bool = False) -> Callable[[Env], Trial]:
    """A copy of the shared bundle; `mutate` damages it and returns the subject (relative to the bundle)."""

    def build(env: Env) -> Trial:
        bundle = copy_of(env.shared.trained[1], env.tmp / "bundle")
        rel = mutate(bundle)
        subject = str(bundle) if rel == "." else str(bundle / rel)
        if via_cli:
            study = env.tmp / "study"
            save_png(study / "P1" / "L" / "US" / "scan.png")
            return Trial(cli("predict", study, "--model", bundle, "-o", env.tmp / "out", "--no-heatmaps",
                             "--cache-dir", env.tmp / "cache"), subject)
        return Trial(lambda: load_bundle(bundle), subject, bundle / "smuggled")

    return build


def _flip_a_byte(bundle: Path) -> str:
    path = bundle / "weights" / "fold_0.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    return "weights/fold_0.safetensors"


def _pickled_weights(bundle: Path) -> str:
    (bundle / "weights" / "fold_0.safetensors").write_bytes(pickle.dumps({"x": _Smuggler(bundle / "smuggled")}))
    _rehash(bundle, "weights/fold_0.safetensors")
    return "weights/fold_0.safetensors"


def _verify_pickle_refused(trial: Trial) -> None:
    with pytest.raises(WeightsError) as info:
        trial.action()
    _names(str(info.value), trial.subject, "not a loadable weights file")
    assert not trial.path.exists()  # the pickle never ran


def _edited_config(bundle: Path) -> str:
    path = bundle / "config.yaml"
    path.write_text(path.read_text().replace("fusion: concat", "fusion: cross_attention"))
    return "config.yaml"


def _weights_file_removed(bundle: Path) -> str:
    (bundle / "weights" / "fold_1.safetensors").unlink()
    return "weights/fold_1.safetensors"


def _no_bundle_json(bundle: Path) -> str:
    (bundle / "bundle.json").unlink()
    return "."


def _bundle_json(edit: Callable[[dict], object]) -> Callable[[Path], str]:
    def mutate(bundle: Path) -> str:
        meta = json.loads((bundle / "bundle.json").read_text())
        (bundle / "bundle.json").write_text(json.dumps(edit(meta)))
        return "bundle.json"

    return mutate


def _corrupt_bundle_json(bundle: Path) -> str:
    (bundle / "bundle.json").write_text('{"format": 1, ')
    return "bundle.json"


BUNDLE = [
    Case("bundle-weights-modified", "bundle", bundle_copy(_flip_a_byte, via_cli=True),
         CliError("checksum does not match bundle.json"),
         "`breastfusion predict`: exit 3, `<file>: checksum does not match bundle.json (modified or corrupt); "
         "refusing it`"),
    Case("bundle-pickle-weights", "bundle", bundle_copy(_pickled_weights), Behaves(_verify_pickle_refused),
         "WeightsError: `<file>: not a loadable weights file (...)`; the pickle is never run"),
    Case("bundle-config-edited", "bundle", bundle_copy(_edited_config),
         Raises(WeightsError, "checksum does not match bundle.json"), "WeightsError: `<bundle>/config.yaml: checksum "
                                                                      "does not match bundle.json ...`"),
    Case("bundle-weights-file-missing", "bundle", bundle_copy(_weights_file_removed),
         Raises(WeightsError, "missing from the bundle"), "WeightsError: `<file>: missing from the bundle`"),
    Case("bundle-json-missing", "bundle", bundle_copy(_no_bundle_json),
         Raises(WeightsError, "not a breastfusion bundle (no bundle.json)"),
         "WeightsError: `<folder>: not a breastfusion bundle (no bundle.json)`"),
    Case("bundle-json-corrupt", "bundle", bundle_copy(_corrupt_bundle_json), Raises(WeightsError, "unreadable"),
         "WeightsError: `<bundle.json>: unreadable (...)`"),
    Case("bundle-from-a-future-version", "bundle", bundle_copy(_bundle_json(lambda m: {**m, "format": 2})),
         Raises(WeightsError, "bundle format 2, this version reads 1"),
         "WeightsError: `<bundle.json>: bundle format 2, this version reads 1`"),
    Case("bundle-json-without-folds", "bundle",
         bundle_copy(_bundle_json(lambda m: {k: v for k, v in m.items() if k != "folds"})),
         Raises(WeightsError, ""), "WeightsError naming bundle.json"),
    Case("bundle-json-not-an-object", "bundle", bundle_copy(_bundle_json(lambda m: [1, 2])),
         Raises(WeightsError, ""), "WeightsError naming bundle.json"),
]


# -- predict ---------------------------------------------------------------------------------------


def predicted(verify: Callable[[Result, Path, dict], None]) -> tuple[Callable[[Env], Trial], Behaves]:
    def build(env: Env) -> Trial:
        return Trial(lambda: env.shared.predicted, "predict")

    def check(trial: Trial) -> None:
        result, out = trial.action()
        verify(result, out, json.loads((out / "predictions.json").read_text()))

    return build, Behaves(check)


def _others_predicted(result: Result, out: Path, summary: dict) -> None:
    assert set(pd.read_csv(out / "predictions.csv")["case_id"]) == {"GOOD1:L", "GOOD2:L"}
    assert "Traceback" not in result.output


def _bad_patient_skipped(result, out, summary) -> None:
    _others_predicted(result, out, summary)
    with open(out / "skipped.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[1:] == [["BAD/L/MG/CC.png", "zero-byte file"], ["BAD/L/US/scan.png", "not an image or DICOM file"]]
    assert "skipped: 2" in result.output


def _bad_patient_reported(result, out, summary) -> None:
    _others_predicted(result, out, summary)
    said = [key for key in summary if "skip" in key] + [key for key in summary["not_predicted"] if "skip" in key]
    assert said, "predictions.json does not say that files were skipped at ingest"


def _doppler_patient(result, out, summary) -> None:
    _others_predicted(result, out, summary)
    assert summary["not_predicted"]["instance: US image refused by preprocessing"] == 1
    assert "colour policy is reject" in summary["refused_images"]["doppler.png"]
    assert "1 instance: US image refused by preprocessing" in result.output


def _patient_without_us(result, out, summary) -> None:
    _others_predicted(result, out, summary)
    assert summary["not_predicted"]["no US image"] == 1
    assert "1 no US image" in result.output


def _nothing_usable(env: Env) -> Trial:
    study = env.tmp / "study"
    (study / "X" / "L" / "US").mkdir(parents=True)
    (study / "X" / "L" / "US" / "scan.png").write_bytes(b"")
    return Trial(cli("predict", study, "--model", env.shared.trained[1], "-o", env.tmp / "out", "--no-heatmaps",
                     "--cache-dir", env.tmp / "cache"), "no patient has the images this model needs")


def _manifest_with_missing_file(env: Env) -> Trial:
    data = env.tmp / "data"
    save_png(data / "a.png")
    path = data / "m.csv"
    path.write_text(f"{HEADER}\nP1,L,US,,,a.png,,\nP1,L,US,,,gone.png,,\n")
    return Trial(cli("predict", path, "--model", env.shared.trained[1], "-o", env.tmp / "out", "--no-heatmaps",
                     "--cache-dir", env.tmp / "cache"), str(data.resolve() / "gone.png"))


PREDICT = [
    Case("predict-patient-with-only-bad-files", "predict", *predicted(_bad_patient_skipped),
         "the other patients are predicted; the bad files are in OUT/skipped.csv with their reasons and counted in "
         "the printed ingest summary; the patient is absent from predictions.csv"),
    Case("predict-bad-patient-reported-in-outputs", "predict", *predicted(_bad_patient_reported),
         "predictions.json lists the files skipped at ingest with their reasons (`skipped_at_ingest`): the "
         "patient is not silently missing"),
    Case("predict-doppler-only-patient", "predict", *predicted(_doppler_patient),
         "not predicted, counted (`instance: US image refused by preprocessing`), image in `refused_images` "
         "of predictions.json; the others are predicted"),
    Case("predict-patient-without-us", "predict", *predicted(_patient_without_us),
         "not predicted, counted (`no US image`) in predictions.json and the `not predicted:` line"),
    Case("predict-nothing-usable", "predict", _nothing_usable, CliError(""),
         "exit 3, `error: no patient has the images this model needs (...)`"),
    Case("predict-manifest-missing-file", "predict", _manifest_with_missing_file, CliError("file not found"),
         "`breastfusion predict M.csv`: exit 3, the ManifestError line `P1:L gone.png: file not found: <path>`"),
]


# -- CLI -------------------------------------------------------------------------------------------


def _debug(env: Env) -> Trial:
    path = env.tmp / "m.csv"
    path.write_text(f"{HEADER}\nP1,L,US,,,a.png,cancer,\n")
    return Trial(cli("--debug", "validate", path), str(path))


def _verify_debug_raises(trial: Trial) -> None:
    result = trial.action()
    assert isinstance(result.exception, ManifestError)  # re-raised: Python prints the traceback
    assert "unknown label 'cancer'" in str(result.exception)


CLI = [
    Case("cli-debug-shows-traceback", "cli", _debug, Behaves(_verify_debug_raises),
         "with `--debug` the error is re-raised (traceback) instead of the one-line `error:`"),
]


CASES: list[Case] = [*INGEST, *LABELS, *MANIFEST, *PREPROCESSING, *TRAINING, *CONFIG, *EXPORT, *BUNDLE, *PREDICT,
                     *CLI]


def _param(case: Case):
    marks = [pytest.mark.xfail(strict=True, raises=case.raises, reason=f"BUG: {case.bug}")] if case.bug else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, shared: Shared):
    case.expect.check(case.build(Env(tmp_path, shared)))


def test_case_ids_are_unique_and_enough():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 30


def test_reliability_doc_lists_every_case():
    doc = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    missing = [c.id for c in CASES if f"tests/test_bad_inputs.py::test_bad_input[{c.id}]" not in doc]
    assert not missing, f"docs/reliability.md does not list: {missing}"
