"""What a DICOM header says about an image, read from tags only (pixels are not touched here).

`describe(ds)` returns a `DicomInfo`; its `reject_reason` says why the image
cannot be used (None when it can), its `flags` what is unusual but kept.

Modality
    MG -> MG. DX or CR -> MG when BodyPartExamined is BREAST, the SOP class is
    a mammography one, or a mammography view (ViewPosition or ViewCodeSequence)
    is present. US -> US. Anything else -> None (rejected).

Side
    ImageLaterality, else Laterality, else the text of ViewPosition,
    SeriesDescription and ProtocolName ("L CC", "RMLO", "R-MLO", "LEFT",
    "RIGHT", "L BREAST"; flagged "laterality from text"). B (both breasts),
    U (unpaired), tags or descriptions that disagree with each other, or
    nothing at all -> None (rejected: "unknown laterality" or "conflicting
    laterality").

View (MG only; US images get View.NONE)
    ViewCodeSequence (SNOMED-RT R-10242 / SNOMED CT 399162004 = CC,
    R-10226 / 399368009 = MLO, or the code meanings "cranio-caudal" and
    "medio-lateral oblique"), else ViewPosition, else the text of
    SeriesDescription / ProtocolName. Any other view (ML, LM, XCCL, ...), a
    ViewModifierCodeSequence (spot compression, magnification, implant
    displaced...) or "spot" / "mag" in the series description -> View.OTHER,
    flagged. No view found -> View.OTHER, flagged "view unknown". OTHER images
    stay in the manifest; the MG branch does not use them.

Kind (MG only; US images get Kind.NONE)
    SYNTHESIZED when SeriesDescription, ImageType, ProtocolName,
    AcquisitionDeviceProcessingDescription or DerivationDescription contains,
    case-insensitively and with "-", "_" and spaces treated alike, one of:
    C-View / CView (Hologic), Generated 2D / GENERATED_2D, Insight 2D
    (Siemens), V-Preview (GE), S-View (Fujifilm), synth... (Synthesized,
    Synthesised, Synthetic, 2D synth). Study-level descriptions are not read:
    a study named "Tomo + C-View" also holds the standard 2D images.
    Otherwise STANDARD.

Rejected (in this order): no pixel data; Breast Tomosynthesis or Breast
Projection X-Ray SOP classes; NumberOfFrames > 1 (DBT volumes, cine loops);
FOR PROCESSING images (PresentationIntentType or SOP class): skipped, not
only flagged, because they are raw detector data on another intensity scale
than the FOR PRESENTATION images the model is trained on, and they duplicate
those images; a modality that is not MG or US; no PatientID; unknown or
conflicting laterality; a single-frame tomosynthesis slice or projection
(an ImageType value in `TOMO_IMAGE_TYPES`, or "tomo" / "DBT" in the
SeriesDescription, without a synthesized marker).

Subgroup attributes (for the cohort table; never a reason to reject)
    age_bin: PatientAge ("054Y", "030M", "012W", "005D"), else the years
    between PatientBirthDate and StudyDate (else AcquisitionDate,
    ContentDate, SeriesDate) when both parse, as a 10-year bin ("50-59",
    top-coded "90+"; `records.age_bin`); "" when neither gives an age.
    manufacturer: Manufacturer; model_name: ManufacturerModelName; both cleaned
    to letters, digits, spaces, "-", "." and "_", 64 characters at most.

Privacy: only the tags named above are read. Flags and reasons hold fixed
words and coded values (CS values, code meanings cleaned to letters and
digits), never free text from the file, so they may be logged.
`series_description` is kept in `DicomInfo` for the caller's logic only and
must not be written anywhere. The exact age, the birth date and the study
dates are read only to compute the age bin: they are never kept in
`DicomInfo`, logged, or put in any message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date

from pydicom.dataset import Dataset

from ..records import age_bin, clean_attribute
from ..vocab import Kind, Modality, Side, View
from .pixels import quiet_pydicom

SOP_MAMMOGRAPHY = {
    "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # ... - For Processing
}
SOP_TOMOSYNTHESIS = {
    "1.2.840.10008.5.1.4.1.1.13.1.3": "breast tomosynthesis volume",
    "1.2.840.10008.5.1.4.1.1.13.1.4": "breast projection X-ray (tomosynthesis projections)",
    "1.2.840.10008.5.1.4.1.1.13.1.5": "breast projection X-ray (tomosynthesis projections)",
}
SOP_FOR_PROCESSING = {
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography - For Processing
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray - For Processing
    "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray - For Processing
}
VIEW_CODES = {
    "R-10242": View.CC,
    "399162004": View.CC,
    "R-10226": View.MLO,
    "399368009": View.MLO,
}
VIEW_MEANINGS = {
    "cranio caudal": View.CC,
    "craniocaudal": View.CC,
    "medio lateral oblique": View.MLO,
    "mediolateral oblique": View.MLO,
}
MG_VIEW_TERMS = ("CC", "MLO", "ML", "LM", "LMO", "XCCL", "XCCM", "XCC", "FB", "SIO", "AT", "CV")
TEXT_VIEW_TERMS = ("CC", "MLO", "ML", "LM", "LMO", "XCCL", "XCCM", "XCC", "FB", "SIO")  # no English words
TOMO_IMAGE_TYPES = {"TOMO", "TOMOSYNTHESIS", "TOMO_PROJ", "TOMO_RECON", "TOMO_SLICE", "TOMO_SLAB", "VOLUME"}
KIND_FIELDS = (
    "SeriesDescription",
    "ImageType",
    "ProtocolName",
    "AcquisitionDeviceProcessingDescription",
    "DerivationDescription",
)
TEXT_FIELDS = ("ViewPosition", "SeriesDescription", "ProtocolName")
STUDY_DATE_FIELDS = ("StudyDate", "AcquisitionDate", "ContentDate", "SeriesDate")  # in order of preference
MAX_AGE_YEARS = 130  # an older "age" comes from a placeholder birth date: no age

_SYNTHESIZED = re.compile(
    r"\bc ?view\b|\bs ?view\b|\bv ?preview\b|\bgenerated ?2d\b|\binsight ?2d\b|\bsynth|2d ?synth"
)
_VIEW_ALT = "|".join(sorted(TEXT_VIEW_TERMS, key=len, reverse=True)).lower()
_SIDE_WITH_VIEW = re.compile(rf"\b([lr]) ?(?:{_VIEW_ALT})\b")
_SIDE_WORD = re.compile(r"\b(left|right)\b|\b([lr]) ?(?:breast|br)\b|\bbreast ([lr])\b")
_VIEW_WORD = re.compile(rf"(?:\b|(?<=\b[lr]))({_VIEW_ALT})\b")
_TOMO_WORD = re.compile(r"\b(?:tomo|tomosynthesis|dbt)\b")
_SPOT_OR_MAG = re.compile(r"\b(?:spot|mag|magnification|magnified)\b")
_PATIENT_AGE = re.compile(r"^(\d{1,3}) ?([DWMY]?)$")
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}


@dataclass
class DicomInfo:
    """What breastfusion takes from one DICOM header."""

    modality: Modality | None
    patient_id: str
    series_description: str
    side: Side | None
    view: View | None
    kind: Kind | None
    flags: list[str] = field(default_factory=list)
    reject_reason: str | None = None
    age_bin: str = ""  # a 10-year bin, never the exact age
    manufacturer: str = ""
    model_name: str = ""


def describe(ds: Dataset) -> DicomInfo:
    """Read modality, patient, side, view, kind, flags and any reason to reject from a header."""
    with quiet_pydicom():  # pydicom converts values on first access and may warn quoting them
        return _describe(ds)


def _describe(ds: Dataset) -> DicomInfo:
    flags: list[str] = []
    modality = _modality(ds)
    side = _side(ds, flags)
    view, kind = View.NONE, Kind.NONE
    if modality is Modality.MG:
        view = _view(ds, flags)
        kind = Kind.SYNTHESIZED if _is_synthesized(ds) else Kind.STANDARD
    elif modality is None:
        view, kind = None, None
    info = DicomInfo(
        modality=modality,
        patient_id=_text(ds, "PatientID"),
        series_description=_text(ds, "SeriesDescription"),
        side=side,
        view=view,
        kind=kind,
        flags=flags,
        age_bin=age_bin(_age_years(ds)),
        manufacturer=clean_attribute(_text(ds, "Manufacturer")),
        model_name=clean_attribute(_text(ds, "ManufacturerModelName")),
    )
    info.reject_reason = _reject_reason(ds, info)
    return info


# -- age (only its bin leaves this module) -----------------------------------------------------


def parse_patient_age(text: str) -> float | None:
    """A DICOM AS value ("054Y", "030M", "012W", "005D"; digits alone read as years) in years;
    None when it does not parse. The value is PHI: callers keep only `records.age_bin` of it."""
    match = _PATIENT_AGE.match(str(text).strip().upper())
    if not match:
        return None
    years = int(match.group(1)) * _DAYS_PER_UNIT[match.group(2) or "Y"] / 365.25
    return years if years <= MAX_AGE_YEARS else None


def _dicom_date(text: str) -> date | None:
    """A DA value (YYYYMMDD; "YYYY.MM.DD" of old files too), or None."""
    digits = re.sub(r"[^0-9]", "", text)
    if len(digits) != 8:
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None


def years_between(birth: date, on: date) -> int:
    """Completed years of life on a date."""
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def _age_years(ds: Dataset) -> float | None:
    """Age in years at the study: PatientAge, else PatientBirthDate to the first study date that parses."""
    age = parse_patient_age(_text(ds, "PatientAge"))
    if age is not None:
        return age
    birth = _dicom_date(_text(ds, "PatientBirthDate"))
    if birth is None:
        return None
    for keyword in STUDY_DATE_FIELDS:
        on = _dicom_date(_text(ds, keyword))
        if on is not None:
            years = years_between(birth, on)
            return years if 0 <= years <= MAX_AGE_YEARS else None
    return None


# -- modality ----------------------------------------------------------------------------------


def _modality(ds: Dataset) -> Modality | None:
    code = _code(header_value(ds, "Modality"))
    if code == "MG" or _text(ds, "SOPClassUID") in SOP_MAMMOGRAPHY:
        return Modality.MG
    if code == "US":
        return Modality.US
    if code in ("DX", "CR") and (_code(header_value(ds, "BodyPartExamined")) == "BREAST" or _has_mg_view(ds)):
        return Modality.MG
    return None


def _has_mg_view(ds: Dataset) -> bool:
    item = _first_item(ds, "ViewCodeSequence")
    if item is not None and (
        _text(item, "CodeValue") in VIEW_CODES or _meaning(item) in VIEW_MEANINGS
    ):
        return True
    return _view_term(_text(ds, "ViewPosition")) is not None


# -- side --------------------------------------------------------------------------------------


def _side(ds: Dataset, flags: list[str]) -> Side | None:
    found = {value for value in (_code(header_value(ds, k)) for k in ("ImageLaterality", "Laterality")) if value}
    from_text = _sides_in_text(_normalised(_text(ds, k)) for k in TEXT_FIELDS)
    if found & {"B", "U"}:
        flags.append("laterality both or unpaired")
        return None
    tagged = {side for side in (_parse_side(value, flags) for value in found) if side is not None}
    if len(tagged) != len(found):
        return None
    if len(tagged | from_text) > 1:
        flags.append("conflicting laterality (tags or descriptions disagree)")
        return None
    if not tagged and from_text:
        flags.append("laterality from text")
    return next(iter(tagged | from_text), None)


def _parse_side(value: str, flags: list[str]) -> Side | None:
    try:
        return Side.parse(value)
    except ValueError:
        flags.append(f"laterality value {value}")
        return None


def _sides_in_text(texts: Iterable[str]) -> set[Side]:
    sides: set[Side] = set()
    for text in texts:
        for match in _SIDE_WITH_VIEW.finditer(text):
            sides.add(Side.parse(match.group(1)))
        for match in _SIDE_WORD.finditer(text):
            letter = (match.group(1) or match.group(2) or match.group(3))[0]
            sides.add(Side.parse(letter))
    return sides


# -- view --------------------------------------------------------------------------------------


def _view(ds: Dataset, flags: list[str]) -> View:
    item = _first_item(ds, "ViewCodeSequence")
    modifier = _first_item(item, "ViewModifierCodeSequence") if item is not None else None
    if modifier is not None:
        flags.append(f"view modifier ({_clean(_meaning(modifier)) or 'coded'})")
        return View.OTHER
    term = _coded_term(item) or _view_term(_text(ds, "ViewPosition"))
    if term is None:
        terms = _terms_in_text(ds)
        if len(terms) > 1:
            flags.append("conflicting views in descriptions")
            return View.OTHER
        term = terms.pop() if terms else None
    if term is None:
        flags.append("view unknown")
        return View.OTHER
    view = {"CC": View.CC, "MLO": View.MLO}.get(term)
    if view is None:
        flags.append(f"other view ({term})")
        return View.OTHER
    if _SPOT_OR_MAG.search(_normalised(_text(ds, "SeriesDescription"))):
        flags.append("spot or magnification view")
        return View.OTHER
    return view


def _coded_term(item: Dataset | None) -> str | None:
    """'CC' or 'MLO' for their codes or meanings, another view's cleaned meaning, or None."""
    if item is None:
        return None
    code, meaning = _text(item, "CodeValue"), _meaning(item)
    view = VIEW_CODES.get(code) or VIEW_MEANINGS.get(meaning)
    if view is not None:
        return view.value
    return _clean(meaning) or _clean(code) or None


def _view_term(value: str) -> str | None:
    """'CC', 'RCC', 'L-MLO', 'XCCL' -> the view term; None when it is not a mammography view."""
    term = re.sub(r"^[LR][ _-]?(?=[A-Z]{2})", "", value.strip().upper())
    return term if term in MG_VIEW_TERMS else None


def _terms_in_text(ds: Dataset) -> set[str]:
    texts = [_normalised(_text(ds, k)) for k in ("SeriesDescription", "ProtocolName")]
    return {m.group(1).upper() for text in texts for m in _VIEW_WORD.finditer(text)}


# -- kind and rejection ------------------------------------------------------------------------


def _is_synthesized(ds: Dataset) -> bool:
    return any(_SYNTHESIZED.search(_normalised(_text(ds, key))) for key in KIND_FIELDS)


def _is_tomo_slice(ds: Dataset) -> bool:
    """ImageType or SeriesDescription of a tomosynthesis slice, slab or projection."""
    if any(part.strip().upper() in TOMO_IMAGE_TYPES for part in _values(header_value(ds, "ImageType"))):
        return True
    return bool(_TOMO_WORD.search(_normalised(_text(ds, "SeriesDescription"))))


def _reject_reason(ds: Dataset, info: DicomInfo) -> str | None:
    sop = _text(ds, "SOPClassUID")
    frames = _int(header_value(ds, "NumberOfFrames"), 1)
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return "DICOM without pixel data"
    if sop in SOP_TOMOSYNTHESIS:
        return f"{SOP_TOMOSYNTHESIS[sop]}: DBT volumes and projections are not used"
    if frames > 1:
        return f"multi-frame object ({frames} frames): DBT volumes and cine loops are not used"
    if _code(header_value(ds, "PresentationIntentType")) == "FOR PROCESSING" or sop in SOP_FOR_PROCESSING:
        return "FOR PROCESSING image (raw detector data): only FOR PRESENTATION images are used"
    if info.modality is None:
        return f"modality {_code(header_value(ds, 'Modality')) or 'missing'} is not MG, US or a breast DX/CR"
    if not info.patient_id:
        return "no PatientID"
    if info.side is None:
        conflict = any(flag.startswith("conflicting laterality") for flag in info.flags)
        return "conflicting laterality" if conflict else "unknown laterality"
    if info.modality is Modality.MG and info.kind is Kind.STANDARD and _is_tomo_slice(ds):
        return "tomosynthesis slice or projection (not a 2D or synthesized 2D image)"
    return None


# -- tag helpers -------------------------------------------------------------------------------


def _values(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str | bytes):
        return [value.decode(errors="replace") if isinstance(value, bytes) else value]
    try:
        return [str(v) for v in value]  # type: ignore[union-attr]
    except TypeError:
        return [str(value)]


def header_value(ds: Dataset, keyword: str) -> object:
    """`ds.get(keyword)`, or None when pydicom cannot convert the element (an unknown VR, a
    malformed value): a damaged element reads as missing, wherever the header is consulted."""
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001 - pydicom raises NotImplementedError, ValueError, ... on conversion
        return None


def _text(ds: Dataset, keyword: str) -> str:
    try:
        return " ".join(_values(header_value(ds, keyword))).strip()
    except Exception:  # noqa: BLE001 - a malformed value reads as missing
        return ""


def _code(value: object) -> str:
    """A CS value made safe to print: upper case letters, digits, space and underscore, 16 at most."""
    text = " ".join(_values(value)).upper()
    return re.sub(r"[^A-Z0-9_ ]", "", text).strip()[:16]


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9 -]", "", text).strip()[:40]


def _normalised(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _meaning(item: Dataset) -> str:
    return _normalised(_text(item, "CodeMeaning"))


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    try:
        seq = header_value(ds, keyword)
        return seq[0] if seq else None
    except Exception:  # noqa: BLE001 - a malformed sequence reads as missing
        return None


def _int(value: object, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return default
