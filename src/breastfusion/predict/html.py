"""Self-contained HTML reports: one file per patient, and a ranked worklist for a batch.

Every report is a single HTML file that needs nothing else to display: images are
embedded as PNG data URIs, styles are inline, there are no scripts, and a
Content-Security-Policy meta tag forbids every network request (`default-src 'none'`),
so opening a report never contacts a server. The only links are the worklist's
relative links to the patients' report files.

Every text value that comes from data (case ids, file names, warnings, model info)
is escaped with `html.escape`.
"""

from __future__ import annotations

import base64
import csv
import io
import math
import os
from dataclasses import dataclass, field
from html import escape
from pathlib import Path, PureWindowsPath
from urllib.parse import quote

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


def _e(text: object) -> str:
    return escape(str(text), quote=True)


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; margin: 1.5em; color: #1a1a1a;
       background: #ffffff; }
h1 { font-size: 1.4em; margin: 0.3em 0; } h2 { font-size: 1.1em; margin: 1.2em 0 0.4em; }
.notice { background: #fff3cd; border: 1px solid #d4a017; padding: 0.5em 0.8em; font-weight: 600; }
.decision { font-size: 1.5em; font-weight: 700; padding: 0.5em 0.8em; margin: 0.6em 0; border-radius: 4px;
            border: 2px solid #555; }
.decision-recall { background: #f8d7da; border-color: #b02a37; color: #58151c; }
.decision-routine { background: #d1e7dd; border-color: #146c43; color: #0a3622; }
.decision-review { background: #fff3cd; border-color: #b08900; color: #523e02; }
.decision-other { background: #e2e3e5; border-color: #555; color: #1a1a1a; }
table { border-collapse: collapse; margin: 0.3em 0; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; }
td.probability { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f0f0f0; }
.warnings li { color: #8a4b00; }
.panels { display: flex; flex-wrap: wrap; gap: 1em; }
figure.panel { margin: 0; border: 1px solid #ccc; padding: 0.5em; }
figure.panel .pair { display: flex; gap: 0.5em; }
figure.panel .pair div { text-align: center; font-size: 0.85em; }
img.scan, img.heatmap { width: 256px; height: auto; image-rendering: pixelated; display: block; }
.caption { font-size: 0.85em; color: #444; margin: 0.3em 0 0; }
.model-info { font-size: 0.85em; }
a { color: #0b5394; }
"""


def _head(title: str) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>{_e(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
    )


def _notice() -> str:
    return f'<p class="notice" id="notice">{_e(NOTICE)}</p>\n'


def _model_info_table(model_info: dict[str, str]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in model_info.items())
    return f'<h2>Model</h2>\n<table class="model-info" id="model-info">{rows}</table>\n'


def _probability_cells(probs: dict[str, float], classes: list[str]) -> str:
    return "".join(
        f'<td class="probability" data-class="{_e(c)}">{format_probability(probs.get(c))}</td>' for c in classes
    )


# --------------------------------------------------------------------------- patient report


def _panel_html(panel: ImagePanel, index: int) -> str:
    title = _e(panel.title)
    scan = (
        f'<div><img class="scan" src="{data_uri(grey_png(panel.image))}" alt="{title}"'
        f' data-panel="{index}"><span>input</span></div>'
    )
    heat = ""
    if panel.heatmap is not None:
        cls = _e(panel.heatmap_class or "unspecified class")
        heat = (
            f'<div><img class="heatmap" src="{data_uri(overlay_png(panel.image, panel.heatmap))}"'
            f' alt="Grad-CAM {cls}: {title}" data-panel="{index}" data-class="{cls}">'
            f'<span class="heatmap-class">Grad-CAM: {cls}</span></div>'
        )
    caption = f'<p class="caption">{_e(panel.caption)}</p>' if panel.caption else ""
    return (
        f'<figure class="panel" data-panel="{index}"><figcaption>{title}</figcaption>'
        f'<div class="pair">{scan}{heat}</div>{caption}</figure>\n'
    )


def patient_report_html(result: PatientResult, model_info: dict[str, str]) -> str:
    """One self-contained HTML page for one patient (see the module docstring)."""
    classes = _classes(result.probabilities, *(row.probabilities for row in result.instances))
    header = "".join(f"<th>{_e(c)}</th>" for c in classes)
    kind = decision_kind(result.decision)
    parts = [_head(f"breastfusion report {result.case_id}"), "<body>\n", _notice()]
    parts.append(f'<h1>Case <span id="case-id">{_e(result.case_id)}</span></h1>\n')
    parts.append(
        f'<div id="decision" class="decision decision-{kind}" data-kind="{kind}">'
        f"Decision: {_e(result.decision)}</div>\n"
    )
    parts.append(
        '<table id="triage"><tr><th>Triage (majority vote)</th>'
        f'<td id="triage-vote">{_e(result.triage_vote)}</td></tr>'
        f'<tr><th>Triage (mean probability)</th><td id="triage-mean">{_e(result.triage_mean)}</td></tr></table>\n'
    )
    if result.warnings:
        items = "".join(f"<li>{_e(w)}</li>" for w in result.warnings)
        parts.append(f'<h2>Warnings</h2>\n<ul class="warnings" id="warnings">{items}</ul>\n')
    parts.append(
        f'<h2>Patient-level probabilities</h2>\n<table id="patient-probabilities"><tr>{header}</tr>'
        f"<tr>{_probability_cells(result.probabilities, classes)}</tr></table>\n"
    )
    rows = "".join(
        f'<tr class="instance" data-instance="{_e(row.instance_id)}"><td>{_e(row.instance_id)}</td>'
        f"<td>{_e(row.us_image)}</td>{_probability_cells(row.probabilities, classes)}</tr>"
        for row in result.instances
    )
    parts.append(
        f'<h2>Per-instance probabilities ({len(result.instances)})</h2>\n<table id="instance-probabilities">'
        f"<tr><th>instance</th><th>US image</th>{header}</tr>{rows}</table>\n"
    )
    if result.panels:
        panels = "".join(_panel_html(panel, i) for i, panel in enumerate(result.panels))
        parts.append(f'<h2>Images</h2>\n<div class="panels" id="panels">\n{panels}</div>\n')
    parts.append(_model_info_table(model_info))
    parts.append(_notice())
    parts.append("</body>\n</html>\n")
    return "".join(parts)


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
    probs_header = "".join(f"<th>p({_e(c)})</th>" for c in CLASS_NAMES)
    body = []
    for row in rows:
        case = row["case_id"]
        kind = decision_kind(row["decision"])
        if case in report_paths:
            case_cell = f'<a class="report" href="{_e(_relative_href(report_paths[case]))}">{_e(case)}</a>'
        else:
            case_cell = _e(case)
        probs = "".join(
            f'<td class="probability" data-class="{_e(c)}">{format_probability(row[f"p_{c}"])}</td>'
            for c in CLASS_NAMES
        )
        body.append(
            f'<tr class="case" data-case="{_e(case)}" data-rank="{row["rank"]}"><td>{row["rank"]}</td>'
            f"<td>{case_cell}</td>{probs}<td>{_e(row['triage_vote'])}</td><td>{_e(row['triage_mean'])}</td>"
            f'<td class="decision decision-{kind}" data-kind="{kind}">{_e(row["decision"])}</td>'
            f"<td>{row['n_instances']}</td><td>{_e(row['warnings'])}</td></tr>\n"
        )
    return (
        _head("breastfusion worklist")
        + "<body>\n"
        + _notice()
        + f"<h1>Worklist ({len(rows)} cases, ranked by malignant probability)</h1>\n"
        + '<table id="worklist"><tr><th>rank</th><th>case</th>'
        + probs_header
        + "<th>triage (vote)</th><th>triage (mean)</th><th>decision</th><th>instances</th><th>warnings</th></tr>\n"
        + "".join(body)
        + "</table>\n"
        + _model_info_table(model_info)
        + _notice()
        + "</body>\n</html>\n"
    )


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
