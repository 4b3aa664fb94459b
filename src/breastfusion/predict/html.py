"""Self-contained HTML reports: one file per patient, and a ranked worklist for a batch.

Every report is a single HTML file that needs nothing else to display: images are
embedded as PNG data URIs, styles are inline, there are no scripts, and a
Content-Security-Policy meta tag forbids every network request (`default-src 'none'`),
so opening a report never contacts a server. The only links are the worklist's
relative links to the patients' report files.

The pages are rendered from Jinja2 templates (predict/templates/) with autoescaping:
every text value that comes from data (case ids, file names, warnings, model info) is
escaped; no HTML is assembled from strings here.
"""

from __future__ import annotations

import base64
import csv
import functools
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from urllib.parse import quote

import jinja2
import numpy as np
from PIL import Image

from breastfusion.files import write_text
from breastfusion.vocab import CLASS_NAMES

NOTICE = "Research software, not a medical device: not for clinical decisions."
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
HEATMAP_COLORMAP = "jet"
WORKLIST_COLUMNS: tuple[str, ...] = (
    "rank",
    "case_id",
    *(f"p_{name}" for name in CLASS_NAMES),
    "triage_vote",
    "triage_mean",
    "decision",
    "n_instances",
    "warnings",
)


@dataclass
class ImagePanel:
    title: str  # e.g. "CC-2D", "MLO-2D", "US benign (3).png"
    image: np.ndarray  # (H, W) float32 in [0, 1]: the preprocessed model input
    heatmap: np.ndarray | None = None  # (H, W) float in [0, 1]: Grad-CAM for `heatmap_class`, same shape
    heatmap_class: str = ""  # class name the heatmap explains
    caption: str = ""  # one line, e.g. crop info


@dataclass
class InstanceRow:
    instance_id: str
    us_image: str  # file name of the US image ("" for an MG-only model)
    probabilities: dict[str, float]  # class name -> p


@dataclass
class PatientResult:
    case_id: str  # "PATIENT:SIDE", e.g. "P001:L"
    probabilities: dict[str, float]  # patient level: mean over instances
    triage_vote: str  # class name by majority vote
    triage_mean: str  # class name of the mean probability
    decision: str  # operating-point decision, e.g. "recall: suspected malignant", "routine: normal", "review"
    instances: list[InstanceRow]
    panels: list[ImagePanel]
    warnings: list[str] = field(default_factory=list)  # e.g. "MLO view missing", "crop fallback"


# --------------------------------------------------------------------------- images


def _unit_2d(array: np.ndarray, what: str) -> np.ndarray:
    """A finite float (H, W) array clipped to [0, 1]; NaN and inf become 0 / 1."""
    arr = np.asarray(array, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{what} must be a non-empty (H, W) array, got shape {arr.shape}")
    return np.clip(np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def grey_png(image: np.ndarray) -> bytes:
    """PNG bytes of an (H, W) image in [0, 1] as 8-bit greyscale."""
    unit = _unit_2d(image, "image")
    return _png(np.round(unit * 255.0).astype(np.uint8))


def overlay_png(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> bytes:
    """PNG bytes of the grey `image` with `heatmap` (same shape, [0, 1]) in the jet colormap
    alpha-blended on top: `(1 - alpha) * grey + alpha * jet(heatmap)`."""
    from matplotlib import colormaps  # colormaps only: no pyplot, no backend needed

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    grey = _unit_2d(image, "image")
    heat = _unit_2d(heatmap, "heatmap")
    if grey.shape != heat.shape:
        raise ValueError(f"heatmap shape {heat.shape} differs from image shape {grey.shape}")
    colour = colormaps[HEATMAP_COLORMAP](heat)[..., :3].astype(np.float32)
    blended = (1.0 - alpha) * grey[..., None] + alpha * colour
    return _png(np.round(np.clip(blended, 0.0, 1.0) * 255.0).astype(np.uint8))


def data_uri(png: bytes) -> str:
    """`data:image/png;base64,...` for PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# --------------------------------------------------------------------------- formatting


def format_probability(p: float | None) -> str:
    """How every probability is shown in the HTML tables and the CSV: 4 decimals, "n/a" if missing."""
    if p is None:
        return "n/a"
    value = float(p)
    return "n/a" if not math.isfinite(value) else f"{value:.4f}"


def decision_kind(decision: str) -> str:
    """The colour class of a decision: "recall", "routine", "review", or "other"."""
    head = decision.strip().lower()
    for kind in ("recall", "routine", "review"):
        if head.startswith(kind):
            return kind
    return "other"


def _classes(*probability_dicts: dict[str, float]) -> list[str]:
    """CLASS_NAMES first, then any other class names the data carries (sorted)."""
    extra = sorted({name for probs in probability_dicts for name in probs} - set(CLASS_NAMES))
    return [*CLASS_NAMES, *extra]


@functools.cache
def _templates() -> jinja2.Environment:
    """The report templates (predict/templates/*.html), every value autoescaped; a template that
    names an undefined value fails instead of printing nothing."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("breastfusion.predict", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["probability"] = format_probability
    return env


def _render(template: str, model_info: dict[str, str], **values) -> str:
    return _templates().get_template(template).render(csp=CSP, notice=NOTICE, model_info=model_info, **values)


# --------------------------------------------------------------------------- patient report


def patient_report_html(result: PatientResult, model_info: dict[str, str]) -> str:
    """One self-contained HTML page for one patient (see the module docstring)."""
    panels = [{"title": p.title, "caption": p.caption, "scan": data_uri(grey_png(p.image)),
               "heatmap": data_uri(overlay_png(p.image, p.heatmap)) if p.heatmap is not None else "",
               "heatmap_class": p.heatmap_class or "unspecified class"} for p in result.panels]
    return _render("patient.html", model_info, r=result, kind=decision_kind(result.decision), panels=panels,
                   classes=_classes(result.probabilities, *(row.probabilities for row in result.instances)))


def write_patient_report(result: PatientResult, model_info: dict[str, str], path: str | os.PathLike) -> Path:
    """Write `patient_report_html` atomically to `path`."""
    return write_text(path, patient_report_html(result, model_info))


# --------------------------------------------------------------------------- worklist


def _malignant_p(result: PatientResult) -> float:
    p = result.probabilities.get("malignant")
    value = float("nan") if p is None else float(p)
    if not math.isfinite(value):
        raise ValueError(f"case {result.case_id!r} has no finite malignant probability: {p!r}")
    return value


def worklist_rows(results: list[PatientResult]) -> list[dict]:
    """One dict per patient (keys `WORKLIST_COLUMNS`), ranked by malignant probability, highest first,
    ties by case_id. Probabilities are floats (NaN where a class is missing); warnings are joined by "; "."""
    ranked = sorted(results, key=lambda r: (-_malignant_p(r), r.case_id))
    rows = []
    for rank, r in enumerate(ranked, start=1):
        row: dict = {"rank": rank, "case_id": r.case_id}
        for name in CLASS_NAMES:
            p = r.probabilities.get(name)
            row[f"p_{name}"] = float("nan") if p is None else float(p)
        row.update(
            triage_vote=r.triage_vote,
            triage_mean=r.triage_mean,
            decision=r.decision,
            n_instances=len(r.instances),
            warnings="; ".join(r.warnings),
        )
        rows.append(row)
    return rows


def _csv_text_cell(value: str) -> str:
    """Neutralise spreadsheet formulas in a text cell (CSV injection): prefix "'" to =, +, -, @, tab, CR."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _relative_href(path: str | os.PathLike) -> str:
    """A URL-quoted relative link to a local file; absolute paths and URLs are refused.

    quote() escapes ":" as well, so a file named like a case id ("P001:L.html") cannot be read as a URL scheme."""
    text = os.fspath(path)
    if "\\" in text:  # a Windows path
        win = PureWindowsPath(text)
        if win.drive or win.is_absolute() or text.startswith("\\"):
            raise ValueError(f"report path must be a relative local path, got {text!r}")
        text = win.as_posix()
    if not text or text.startswith("/") or "://" in text:
        raise ValueError(f"report path must be a relative local path, got {text!r}")
    return quote(text, safe="/")


def _worklist_html(rows: list[dict], model_info: dict[str, str], report_paths: dict[str, str]) -> str:
    shown = [{**row, "kind": decision_kind(row["decision"]),
              "href": _relative_href(report_paths[row["case_id"]]) if row["case_id"] in report_paths else ""}
             for row in rows]
    return _render("worklist.html", model_info, rows=shown, classes=list(CLASS_NAMES))


def _worklist_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(WORKLIST_COLUMNS)
    for row in rows:
        cells = []
        for col in WORKLIST_COLUMNS:
            value = row[col]
            if col.startswith("p_"):
                cells.append(format_probability(value))
            elif isinstance(value, str):
                cells.append(_csv_text_cell(value))
            else:
                cells.append(str(value))
        writer.writerow(cells)
    return buf.getvalue()


def write_worklist(
    results: list[PatientResult],
    model_info: dict[str, str],
    out_dir: str | os.PathLike,
    report_paths: dict[str, str],
) -> tuple[Path, Path]:
    """Write `worklist.csv` and `worklist.html` into `out_dir`; return (csv path, html path).

    `report_paths` maps case_id to the patient report's path relative to `out_dir`;
    cases without an entry are listed without a link."""
    rows = worklist_rows(results)
    out = Path(out_dir)
    csv_path = write_text(out / "worklist.csv", _worklist_csv(rows))
    html_path = write_text(out / "worklist.html", _worklist_html(rows, model_info, report_paths))
    return csv_path, html_path
