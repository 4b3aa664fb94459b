"""The whole DICOM PS3.15 basic de-identification profile (issue 16, item 3).

A value is planted in every attribute of the Basic Application Level Confidentiality Profile
(PS3.15 Annex E, Table E.1-1) that an MG or US image may carry (`dicom_files.PS315_BASIC`, 214
keywords, four of the profile's sequences and a private element: 219 attributes), in MG (CC and
MLO, 2D and C-View, both sides) and US files of six patients and of one new patient, and in four
files that ingest skips or flags (a duplicate SOPInstanceUID, no laterality, CT, an ML view).
Every command that touches them then runs through the command line, logging at DEBUG: `ingest`
(without and with `--pseudonymise-salt`), `validate`, `cohort`, `contact-sheet`, `experiment`,
`export` and `predict` (a DICOM study folder, heatmaps, HTML reports, arrays). Every file
written under their output folders and the preprocessing cache (text, and the text inside binary
files: PNG text chunks decoded and raw bytes, the headers of .npy and .safetensors files, the
pickles inside torch files), the names of those files and folders, the console output, the log
records and the warnings are scanned for every planted value, and for the salt itself:
case-insensitively, dates also as YYYY-MM-DD, YYYY/MM/DD, YYYY.MM.DD, DD/MM/YYYY and MM/DD/YYYY,
times also as HH:MM:SS.ffffff, date-times also by their date and time parts, names by their
unique token.

Documented exceptions (what breastfusion reads on purpose, and where it may show):

* PatientID is the patient key: without a salt it is the manifest's `patient_id` (so it is
  expected in that manifest, and the scan must find it there: the scanner's positive control).
  Every other output here is made with `--pseudonymise-salt` and must not hold it.
* SeriesDescription and ProtocolName (and AcquisitionDeviceProcessingDescription and
  DerivationDescription) are read for side, view and kind. Here SeriesDescription and
  ProtocolName hold words ("L CC C-View", "screening": outputs may show the view and kind found)
  and a unique token, which must never be written.
* PatientAge (and PatientBirthDate with StudyDate) become a 10-year age bin: the bin "60-69" may
  be written, the planted age "063Y" and the dates never.
* Manufacturer and ManufacturerModelName (not in the profile) are kept as subgroup columns by
  design; they are not planted.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import yaml
from click.testing import CliRunner
from PIL import Image

from breastfusion import logs
from breastfusion.cli import main
from breastfusion.config import BackboneConfig, CVConfig, RunConfig, TrainConfig, to_dict
from breastfusion.vocab import LABELS

from conftest import tiny_model_config
from dicom_files import PRIVATE, PROFILE_SEQUENCES, PS315_BASIC, US_SOP, ProfilePlanter

SALT = "pepperQZsalt16"  # a secret too: whoever holds it can re-identify the pseudonyms
CT_SOP = "1.2.840.10008.5.1.4.1.1.2"


def _pixels(rng: np.random.Generator, us: bool = False) -> np.ndarray:
    if us:
        return (rng.random((48, 48)) * 255).astype(np.uint8)
    return (rng.random((48, 48)) * 4000).astype(np.uint16)


def _patient(planter: ProfilePlanter, folder: Path, pid: str, sides: tuple[str, ...], rng) -> None:
    """CC and MLO, 2D and C-View, and one US image per side, every profile attribute planted."""
    for side in sides:
        for view in ("CC", "MLO"):
            for kind, words in (("2d", f"{side} {view}"), ("cview", f"{side} {view} C-View")):
                planter.write(folder / f"{side}_{view}_{kind}.dcm", _pixels(rng), patient=pid,
                              words={"SeriesDescription": words, "ProtocolName": "screening"},
                              ImageLaterality=side, ViewPosition=view)
        planter.write(folder / f"{side}_us.dcm", _pixels(rng, us=True), patient=pid, sop_class=US_SOP,
                      modality="US", Laterality=side, words={"SeriesDescription": f"{side} breast"})


def _odd_files(planter: ProfilePlanter, folder: Path, rng) -> None:
    """Files that ingest skips or flags, so that its reasons and flags are scanned too: a second
    copy of an image (duplicate SOPInstanceUID), no laterality, a CT image, an ML view."""
    first = planter.write(folder / "a.dcm", _pixels(rng), patient="PIDQZ0000", ImageLaterality="L",
                          ViewPosition="ML", words={"SeriesDescription": "L ML"})
    shutil.copy(first, folder / "b_copy.dcm")
    planter.write(folder / "c.dcm", _pixels(rng), patient="PIDQZ0000", ViewPosition="CC")
    planter.write(folder / "d.dcm", _pixels(rng), patient="PIDQZ0000", modality="CT", sop_class=CT_SOP,
                  ImageLaterality="L")


# -- the scanner ----------------------------------------------------------------------------------

_TOKEN = re.compile(r"PHI\d{3}QZ|PIDQZ\d{4}", re.IGNORECASE)
_DATE = re.compile(r"(?<![\d.])(\d{4})[-/.]?(\d\d)[-/.]?(\d\d)(?!\d)")
_DATE_DAY_FIRST = re.compile(r"(?<![\d.])(\d\d)[/.](\d\d)[/.](\d{4})(?!\d)")
_TIME = re.compile(r"(?<![\d.])(\d\d):?(\d\d):?(\d\d)\.(\d{6})(?!\d)")
_NUMBER = re.compile(r"\b\d{3}Y\b|(?<![\d.])[+-]?\d[\d.]*\d(?!\d)", re.IGNORECASE)  # ages, UIDs, sizes


class Scanner:
    """Finds planted values in text: `hits(text)` -> [(attribute, value as found)]."""

    def __init__(self, planted: dict[str, set[str]], secrets: dict[str, str] | None = None):
        self.secrets = {value.lower(): name for name, value in (secrets or {}).items()}  # found as they are
        self.tokens: dict[str, str] = {}  # token, lower case -> attribute
        self.dates: dict[str, str] = {}  # YYYYMMDD -> attribute
        self.times: dict[str, str] = {}  # HHMMSSffffff -> attribute
        self.numbers: dict[str, str] = {}  # UIDs, sizes, age, offsets -> attribute
        for attribute, values in planted.items():
            for value in values:
                tokens = _TOKEN.findall(value)
                if tokens:
                    self.tokens.update({t.lower(): attribute for t in tokens})
                elif re.fullmatch(r"\d{8}", value):
                    self.dates[value] = attribute
                elif re.fullmatch(r"\d{6}\.\d{6}", value):
                    self.times[value.replace(".", "")] = attribute
                elif re.fullmatch(r"\d{14}\.\d{6}", value):  # a date-time: its date and its time
                    self.dates[value[:8]] = self.times[value[8:].replace(".", "")] = attribute
                    self.numbers[value] = attribute
                else:
                    self.numbers[value.lower()] = attribute

    def hits(self, text: str) -> list[tuple[str, str]]:
        lower = text.lower()
        found = [(name, secret) for secret, name in self.secrets.items() if secret in lower]
        found += [(self.tokens[m.group(0).lower()], m.group(0)) for m in _TOKEN.finditer(text)
                 if m.group(0).lower() in self.tokens]
        for m in _DATE.finditer(text):
            if "".join(m.groups()) in self.dates:
                found.append((self.dates["".join(m.groups())], m.group(0)))
        for m in _DATE_DAY_FIRST.finditer(text):
            day, month, year = m.groups()
            for key in (year + month + day, year + day + month):
                if key in self.dates:
                    found.append((self.dates[key], m.group(0)))
        for m in _TIME.finditer(text):
            if "".join(m.groups()) in self.times:
                found.append((self.times["".join(m.groups())], m.group(0)))
        for m in _NUMBER.finditer(text):
            if m.group(0).lower() in self.numbers:
                found.append((self.numbers[m.group(0).lower()], m.group(0)))
        return found


def _png_texts(data: bytes) -> Iterator[tuple[str, str]]:
    """Every tEXt, zTXt and iTXt chunk of a PNG, decoded: (chunk type, "key: text")."""
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"tEXt":
            yield "tEXt", body.replace(b"\0", b": ").decode("latin-1")
        elif kind == b"zTXt":
            key, _, rest = body.partition(b"\0")
            yield "zTXt", key.decode("latin-1") + ": " + zlib.decompress(rest[1:]).decode("latin-1")
        elif kind == b"iTXt":
            key, _, rest = body.partition(b"\0")
            compressed, rest = rest[0], rest[2:]
            _lang, _, rest = rest.partition(b"\0")
            _tkey, _, text = rest.partition(b"\0")
            yield "iTXt", key.decode("latin-1") + ": " + (zlib.decompress(text) if compressed else text).decode(
                "utf-8", "replace")


def _file_texts(path: Path) -> Iterator[tuple[str, str]]:
    """(where, text) for everything a person or a program could read in a file."""
    data = path.read_bytes()
    suffix = path.suffix.lower()
    if suffix == ".npy":  # the header; the array is numbers
        yield "npy header", data[:256].decode("latin-1")
        return
    if suffix == ".safetensors":  # the JSON header (metadata, tensor names); the rest is numbers
        (size,) = struct.unpack("<Q", data[:8])
        yield "safetensors header", data[8:8 + size].decode("utf-8", "replace")
        return
    if zipfile.is_zipfile(io.BytesIO(data)):  # torch.save files: names and pickles
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for info in zf.infolist():
                yield f"zip member {info.filename}", info.filename
                if not info.filename.split("/")[-2:-1] == ["data"]:  # tensor storages are numbers
                    yield f"zip member {info.filename}", zf.read(info).decode("latin-1")
        return
    if suffix == ".png":
        for kind, text in _png_texts(data):
            yield f"PNG {kind} chunk", text
        with Image.open(path) as img:
            img.load()
            yield "PNG metadata (PIL)", json.dumps({str(k): str(v) for k, v in img.info.items()})
    yield "bytes", data.decode("latin-1")


# -- the test -------------------------------------------------------------------------------------


def test_no_value_of_the_whole_basic_profile_reaches_any_output(tmp_path, caplog, capsys, monkeypatch):
    planter = ProfilePlanter()
    rng = np.random.default_rng(16)
    archive, labels = tmp_path / "archive", ["patient_id,side,label"]
    for p in range(6):
        pid = f"PIDQZ{p:04d}"
        _patient(planter, archive / f"p{p}", pid, ("L", "R"), rng)
        labels += [f"{pid},{side},{LABELS[(2 * p + k) % 3].value}" for k, side in enumerate("LR")]
    (tmp_path / "labels.csv").write_text("\n".join(labels) + "\n")
    _odd_files(planter, archive / "odd", rng)
    study = tmp_path / "study"
    _patient(planter, study, "PIDQZ0099", ("R",), rng)
    planted = dict(planter.planted)
    assert set(planted) == {*PS315_BASIC, *PROFILE_SEQUENCES, PRIVATE} and len(planted) >= 40

    row = RunConfig(name="MM", model=tiny_model_config(mg_slots=["CC-2D", "MLO-2D"], backbone=BackboneConfig(
        name="resnet18", weights="none", frozen="all", image_size=32)),  # C-View ingested, not encoded
        train=TrainConfig(mode="cached", epochs=1, batch_size=8, feature_copies=1, cache_dir=str(tmp_path / "cache")),
        cv=CVConfig(folds=3, test_folds=1))
    config = tmp_path / "rows.yaml"
    config.write_text(yaml.safe_dump({"rows": [to_dict(row)]}))

    out = tmp_path / "out"
    commands = {
        "ingest": ["ingest", archive, "-o", out / "ingest-raw" / "manifest.csv", "--labels", tmp_path / "labels.csv"],
        "ingest --pseudonymise-salt": ["ingest", archive, "-o", out / "ingest" / "manifest.csv", "--labels",
                                       tmp_path / "labels.csv", "--pseudonymise-salt", SALT],
        "validate": ["validate", out / "ingest" / "manifest.csv"],
        "cohort": ["cohort", out / "ingest" / "manifest.csv", "-o", out / "cohort" / "cohort.md", "--json",
                   out / "cohort" / "cohort.json"],
        "contact-sheet": ["contact-sheet", out / "ingest" / "manifest.csv", "-o", out / "sheet" / "sheet.png",
                          "-n", "6", "--size", "32"],
        "experiment": ["experiment", config, "--manifest", out / "ingest" / "manifest.csv", "-o", out / "run",
                       "--bootstrap", "100", "--cache-dir", out / "cache"],
        "export": ["export", out / "run" / "rows" / "MM", "-o", out / "bundle"],
        "predict": ["predict", study, "--model", out / "bundle", "-o", out / "predict", "--save-arrays",
                    "--pseudonymise-salt", SALT, "--cache-dir", out / "cache", "--device", "cpu"],
    }
    inputs = sorted(tmp_path.rglob("*"))
    (out / "cwd").mkdir(parents=True)
    monkeypatch.chdir(out / "cwd")  # anything written to a relative default path is scanned too
    caplog.set_level(logging.DEBUG, logger="breastfusion")
    console = {}
    with warnings.catch_warnings(record=True) as caught, logs.log_to(out / "session"):
        warnings.simplefilter("always")
        for name, args in commands.items():
            result = CliRunner().invoke(main, [*map(str, args), "--verbose"])
            assert result.exit_code == 0, (name, result.output)
            console[f"console of {name}"] = result.output + result.stderr
    assert sorted(p for p in tmp_path.rglob("*") if out not in p.parents and p != out) == inputs  # nothing beside them

    scanner = Scanner(planted, {"the --pseudonymise-salt value": SALT})
    texts: list[tuple[str, str]] = [*console.items(), ("log records", caplog.text),
                                    ("log record messages", "\n".join(r.getMessage() for r in caplog.records)),
                                    ("warnings", "\n".join(f"{w.category.__name__}: {w.message}" for w in caught)),
                                    ("pytest capture", "".join(capsys.readouterr()))]
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert {p.suffix for p in files} >= {".csv", ".json", ".md", ".html", ".png", ".log", ".yaml", ".npy",
                                         ".safetensors"}
    texts += [(f"{p.relative_to(out)} ({where})", text) for p in files for where, text in _file_texts(p)]
    texts.append(("the names of the output files and folders", "\n".join(str(p.relative_to(out)) for p in files)))
    leaks: dict[tuple[str, str], set[str]] = {}  # (attribute, where) -> values found
    kept = {}
    for where, text in texts:
        for attribute, value in scanner.hits(text):
            if attribute == "PatientID" and where.startswith("ingest-raw/manifest.csv"):
                kept[value] = where  # by design: the patient key when no salt is given
                continue
            leaks.setdefault((attribute, where), set()).add(value)
    assert not leaks, (f"identifying values found in the outputs ({len(planted)} attributes planted):\n" + "\n".join(
        f"{attribute} in {where}: {', '.join(sorted(values)[:2])}{' ...' if len(values) > 2 else ''}"
        for (attribute, where), values in sorted(leaks.items())))
    # the scanner's positive control: the unsalted manifest holds each planted PatientID
    assert set(kept) == {f"PIDQZ{p:04d}" for p in range(6)}
    # what was exercised: skip reasons and flags of ingest, heatmaps and reports of predict
    skipped = (out / "ingest" / "skipped.csv").read_text()
    assert "duplicate SOPInstanceUID" in skipped and "unknown laterality" in skipped and "modality CT" in skipped
    assert "other view (ML)" in console["console of ingest"]
    assert len(list((out / "predict" / "heatmaps").rglob("*.png"))) == 3
    assert len(list((out / "predict" / "reports").glob("*.html"))) == 1
    command = json.loads((out / "predict" / "predictions.json").read_text())["provenance"]["command"]
    assert "--pseudonymise-salt '***'" in command  # the salt is masked in the recorded command line


def test_the_scanner_finds_planted_values_in_every_form_it_claims(tmp_path):
    """The scan's own check: dates, times and date-times in other spellings, UIDs only whole,
    names by their token, and text inside compressed PNG chunks, .npy and .safetensors headers."""
    from PIL.PngImagePlugin import PngInfo
    from safetensors.numpy import save_file

    planted = {"StudyDate": {"19470312"}, "StudyTime": {"071523.042554"}, "AcquisitionDateTime":
               {"19520101093000.123456"}, "StudyInstanceUID": {"2.25.900300012"}, "PatientName": {"PHI003QZ^PHI003QZG"},
               "PatientAge": {"063Y"}, "PatientWeight": {"71.3849"}}
    scanner = Scanner(planted, {"salt": SALT})
    texts = ("on 1947-03-12", "12/03/1947", "at 07:15:23.042554", "1952.01.01", "uid 2.25.900300012.", "Mr phi003qz",
             "aged 063y", "71.3849 kg", f"salt={SALT.upper()}")
    found = {a for text in texts for a, _ in scanner.hits(text)}
    assert found == {*planted, "salt"}
    assert not scanner.hits("p 0.19470312 uid 2.25.9003000123 x1947031200 t 071523 w 71.38490 1.2.25.900300012")
    png = tmp_path / "a.png"
    info = PngInfo()
    info.add_text("Comment", "PHI003QZ", zip=True)  # zTXt: compressed, not in the raw bytes
    info.add_itxt("Title", "2.25.900300012", zip=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png, pnginfo=info)
    assert b"PHI003QZ" not in png.read_bytes()
    np.save(tmp_path / "a.npy", np.zeros(2, dtype=[("PHI003QZ", "f4")]))
    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "a.safetensors"), metadata={"note": "063Y"})
    for name, expected in (("a.png", {"PNG zTXt chunk": {"PatientName"}, "PNG iTXt chunk": {"StudyInstanceUID"},
                                      "PNG metadata (PIL)": {"PatientName", "StudyInstanceUID"}, "bytes": set()}),
                           ("a.npy", {"npy header": {"PatientName"}}),
                           ("a.safetensors", {"safetensors header": {"PatientAge"}})):
        got = {where: {a for a, _ in scanner.hits(text)} for where, text in _file_texts(tmp_path / name)}
        assert got == expected, name
