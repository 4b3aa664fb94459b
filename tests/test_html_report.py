"""Self-contained patient reports and worklists (breastfusion.predict.html), incl. a headless-browser check."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import markupsafe
import numpy as np
import pytest
from PIL import Image

from breastfusion.predict.html import (
    CSP,
    NOTICE,
    ImagePanel,
    InstanceRow,
    PatientResult,
    data_uri,
    format_probability,
    grey_png,
    overlay_png,
    patient_report_html,
    worklist_rows,
    write_patient_report,
    write_worklist,
)
from breastfusion.vocab import CLASS_NAMES

MODEL_INFO = {"model_version": "breastfusion-0.3.1-test", "bundle": "fold0-best.bundle", "created": "2024-05-01"}
DATA_URI_PREFIX = "data:image/png;base64,"


# --------------------------------------------------------------------------- generated data


def _probs(normal: float, benign: float, malignant: float) -> dict[str, float]:
    return {"normal": normal, "benign": benign, "malignant": malignant}


def _image(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).random((size, size)).astype(np.float32)


def _heatmap(size: int = 32) -> np.ndarray:
    """A vertical ramp: the overlay shows the whole jet colormap, easy to find in a screenshot."""
    return np.repeat(np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None], size, axis=1)


def _result(
    case_id: str = "P001:L",
    probs: dict[str, float] | None = None,
    decision: str = "recall: suspected malignant",
    us_image: str = "benign (3).png",
    warnings: list[str] | None = None,
) -> PatientResult:
    probs = probs or _probs(0.1234, 0.2345, 0.6421)
    instances = [
        InstanceRow("inst-0", us_image, _probs(0.1111, 0.2222, 0.6667)),
        InstanceRow("inst-1", "benign (4).png", _probs(0.1357, 0.2468, 0.6175)),
    ]
    panels = [
        ImagePanel("CC-2D", _image(1), _heatmap(), "malignant", "crop 0.91 of breast box"),
        ImagePanel("MLO-2D", _image(2), _heatmap().T.copy(), "malignant", "crop fallback: whole image"),
        ImagePanel(f"US {us_image}", _image(3)),
    ]
    return PatientResult(case_id, probs, "malignant", "malignant", decision, instances, panels,
                         warnings if warnings is not None else ["MLO view missing"])


class _Dom(HTMLParser):
    """Every element with its attributes and the text inside it (enough to query a report)."""

    VOID = {"img", "meta", "br", "hr", "link", "input", "source", "base"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[dict] = []
        self._open: list[dict] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, "attrs": {k: (v or "") for k, v in attrs}, "text": []}
        self.elements.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i]["tag"] == tag:
                del self._open[i:]
                break

    def handle_data(self, data):
        for element in self._open:
            element["text"].append(data)

    def find(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list[dict]:
        found = []
        for el in self.elements:
            if tag and el["tag"] != tag:
                continue
            if cls and cls not in el["attrs"].get("class", "").split():
                continue
            if any(el["attrs"].get(k.replace("_", "-")) != v for k, v in attrs.items()):
                continue
            found.append(el)
        return found

    @staticmethod
    def text(element: dict) -> str:
        return " ".join("".join(element["text"]).split())


def _patient_probability_cells(dom: _Dom) -> dict[str, str]:
    """class -> text of the probability cells in the patient-level table."""
    cells = dom.find("td", cls="probability")
    n_per_row = len(CLASS_NAMES)
    return {el["attrs"]["data-class"]: dom.text(el) for el in cells[:n_per_row]}


def _assert_offline_html(text: str) -> None:
    """No scripts, no external resources, and the CSP meta tag that forbids every request."""
    lowered = text.lower()
    assert "http://" not in lowered and "https://" not in lowered
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*//""", lowered), "protocol-relative URL"
    assert "<script" not in lowered and "<link" not in lowered and "<iframe" not in lowered
    assert "url(" not in lowered and "@import" not in lowered and "@font-face" not in lowered
    dom = _Dom(text)
    csp = dom.find("meta", http_equiv="Content-Security-Policy")
    assert len(csp) == 1 and csp[0]["attrs"]["content"] == CSP
    assert "default-src 'none'" in CSP and "img-src data:" in CSP
    for el in dom.elements:
        for attr in ("src", "srcset", "href", "action", "poster", "data"):
            value = el["attrs"].get(attr)
            if value is not None and attr == "src":
                assert value.startswith(DATA_URI_PREFIX), f"<{el['tag']} src> is not a data URI: {value[:40]}"
            elif value is not None and attr == "href":
                parts = urlsplit(value)
                assert not parts.scheme and not parts.netloc and not value.startswith("/"), value
            elif value is not None:
                pytest.fail(f"unexpected resource attribute {attr}={value[:40]!r}")


def _png_from_uri(uri: str) -> np.ndarray:
    assert uri.startswith(DATA_URI_PREFIX)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri[len(DATA_URI_PREFIX):]))))


# --------------------------------------------------------------------------- images


def test_png_helpers_encode_grey_and_overlay():
    image, heat = _image(5), _heatmap()
    grey = np.asarray(Image.open(io.BytesIO(grey_png(image))))
    assert grey.shape == (32, 32) and grey.dtype == np.uint8
    np.testing.assert_array_equal(grey, np.round(image * 255).astype(np.uint8))
    over = np.asarray(Image.open(io.BytesIO(overlay_png(image, heat))).convert("RGB")).astype(int)
    assert over.shape == (32, 32, 3)
    spread = over.max(axis=2) - over.min(axis=2)  # a grey pixel has spread 0; the heatmap adds colour
    assert spread.mean() > 40
    assert over[-1, :, 0].mean() > over[-1, :, 2].mean() + 40  # heat 1 -> red end of jet
    assert over[0, :, 2].mean() > over[0, :, 0].mean() + 40  # heat 0 -> blue end of jet
    assert data_uri(b"\x89PNG").startswith(DATA_URI_PREFIX)
    with pytest.raises(ValueError, match="shape"):
        overlay_png(image, np.zeros((16, 16)))


# --------------------------------------------------------------------------- patient report


def test_patient_report_is_self_contained_and_complete(tmp_path):
    result = _result()
    path = write_patient_report(result, MODEL_INFO, tmp_path / "reports" / "P001_L.html")
    text = path.read_text(encoding="utf-8")
    assert text == patient_report_html(result, MODEL_INFO)
    dom = _Dom(text)

    scans, heatmaps = dom.find("img", cls="scan"), dom.find("img", cls="heatmap")
    assert len(scans) == len(result.panels) == 3
    assert len(heatmaps) == sum(p.heatmap is not None for p in result.panels) == 2
    for img, panel in zip(scans, result.panels, strict=True):
        assert img["attrs"]["src"] == data_uri(grey_png(panel.image))
        assert _png_from_uri(img["attrs"]["src"]).shape == (32, 32)
    for img, panel in zip(heatmaps, [p for p in result.panels if p.heatmap is not None], strict=True):
        assert img["attrs"]["src"] == data_uri(overlay_png(panel.image, panel.heatmap))
        assert img["attrs"]["data-class"] == "malignant"
    assert text.count(DATA_URI_PREFIX) == 5
    assert "Grad-CAM: malignant" in text
    for panel in result.panels:
        assert panel.title in text and panel.caption in text

    cells = _patient_probability_cells(dom)
    assert cells == {"normal": "0.1234", "benign": "0.2345", "malignant": "0.6421"}
    for name in CLASS_NAMES:
        assert cells[name] == format_probability(result.probabilities[name])
    for row in result.instances:
        tr = dom.find("tr", cls="instance", data_instance=row.instance_id)
        assert len(tr) == 1 and row.us_image in dom.text(tr[0])
        for name, p in row.probabilities.items():
            assert f'data-class="{name}">{p:.4f}</td>' in text

    (decision,) = dom.find(id="decision")
    assert "recall: suspected malignant" in dom.text(decision)
    assert "decision-recall" in decision["attrs"]["class"]
    assert dom.text(dom.find(id="triage-vote")[0]) == "malignant"
    assert dom.text(dom.find(id="triage-mean")[0]) == "malignant"
    assert "MLO view missing" in dom.text(dom.find(id="warnings")[0])
    assert NOTICE in text and NOTICE == "Research software, not a medical device: not for clinical decisions."
    info = dom.text(dom.find(id="model-info")[0])
    for key, value in MODEL_INFO.items():
        assert key in info and value in info
    _assert_offline_html(text)


def test_offline_check_catches_external_resources():
    """The static offline check fails on the things it must catch (so the test above can fail)."""
    good = patient_report_html(_result(), MODEL_INFO)
    _assert_offline_html(good)
    for bad in ('<img class="scan" src="https://example.org/a.png">', '<img src="//cdn.example/a.png">',
                "<script>1</script>", '<a href="/etc/passwd">x</a>'):
        with pytest.raises(AssertionError):
            _assert_offline_html(good.replace("</body>", bad + "</body>"))
    with pytest.raises(AssertionError):
        _assert_offline_html(good.replace(str(markupsafe.escape(CSP)), "default-src *"))


def test_text_from_data_is_escaped():
    nasty = "<b>x</b>&"
    result = _result(case_id=nasty, us_image='"><img src=x onerror=alert(1)>.png',
                      warnings=["<script>alert(1)</script>"], decision="review <i>now</i>")
    result.panels[0].title = "<u>CC</u>"
    result.panels[0].caption = "crop & <em>fallback</em>"
    info = {**MODEL_INFO, "bundle": "<s>bundle</s>"}
    text = patient_report_html(result, info)
    for raw in (nasty, "<img src=x", "<script>", "<i>now</i>", "<u>CC</u>", "<em>", "<s>bundle</s>"):
        assert raw not in text
    assert "&lt;b&gt;x&lt;/b&gt;&amp;" in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    dom = _Dom(text)
    assert not dom.find("b") and not dom.find("script") and not dom.find("u") and not dom.find("s")
    assert len(dom.find("img")) == 5  # the injected <img> stays text
    assert dom.text(dom.find(id="case-id")[0]) == nasty  # and reads back as the original text
    _assert_offline_html(text)


def test_script_in_a_patient_id_or_file_name_is_text(tmp_path):
    """The templates autoescape: a patient id or an image file name holding <script> is shown as text."""
    case = "<script>alert('id')</script>:L"
    result = _result(case_id=case, us_image="<script>alert('file')</script>.png")
    result.panels[0].title = "US <script>alert('panel')</script>.png"
    path = write_patient_report(result, MODEL_INFO, tmp_path / "r.html")
    _, worklist = write_worklist([result], MODEL_INFO, tmp_path, {case: "r.html"})
    for text in (path.read_text(encoding="utf-8"), worklist.read_text(encoding="utf-8")):
        assert "<script" not in text.lower() and "&lt;script&gt;alert(" in text
        assert not _Dom(text).find("script")
    dom = _Dom(path.read_text(encoding="utf-8"))
    assert dom.text(dom.find(id="case-id")[0]) == case


def test_worklist_escapes_case_ids(tmp_path):
    nasty = "<b>x</b>&"
    _, html_path = write_worklist([_result(case_id=nasty)], MODEL_INFO, tmp_path, {nasty: "r/<b>.html"})
    text = html_path.read_text(encoding="utf-8")
    assert nasty not in text and "&lt;b&gt;x&lt;/b&gt;&amp;" in text
    dom = _Dom(text)
    assert not dom.find("b")
    (link,) = dom.find("a", cls="report")
    assert unquote(link["attrs"]["href"]) == "r/<b>.html"


# --------------------------------------------------------------------------- worklist


def _batch() -> list[PatientResult]:
    return [
        _result("P003:R", _probs(0.70, 0.20, 0.10), "routine: normal"),
        _result("P001:L", _probs(0.05, 0.15, 0.80), "recall: suspected malignant"),
        _result("P004:L", _probs(0.30, 0.40, 0.30), "review"),
        _result("P002:R", _probs(0.10, 0.60, 0.30), "review", warnings=["crop fallback", "MLO view missing"]),
    ]


def test_worklist_ranks_by_malignant_probability(tmp_path):
    results = _batch()
    expected = ["P001:L", "P002:R", "P004:L", "P003:R"]  # 0.80, then the 0.30 tie by case_id, then 0.10
    rows = worklist_rows(results)
    assert [r["case_id"] for r in rows] == expected
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["warnings"] == "crop fallback; MLO view missing" and rows[1]["n_instances"] == 2
    assert rows[0]["p_malignant"] == pytest.approx(0.80)

    report_paths = {r.case_id: f"reports/{r.case_id}.html" for r in results}
    csv_path, html_path = write_worklist(results, MODEL_INFO, tmp_path / "out", report_paths)
    assert csv_path == tmp_path / "out" / "worklist.csv" and html_path == tmp_path / "out" / "worklist.html"

    with open(csv_path, newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["rank", "case_id", "p_normal", "p_benign", "p_malignant", "triage_vote", "triage_mean",
                              "decision", "n_instances", "warnings"]
    assert [r["case_id"] for r in table] == expected
    assert [r["rank"] for r in table] == ["1", "2", "3", "4"]
    assert table[0]["p_malignant"] == "0.8000" and table[3]["p_normal"] == "0.7000"
    assert table[0]["decision"] == "recall: suspected malignant"

    text = html_path.read_text(encoding="utf-8")
    dom = _Dom(text)
    rows_html = dom.find("tr", cls="case")
    assert [tr["attrs"]["data-case"] for tr in rows_html] == [r["case_id"] for r in table]
    links = dom.find("a", cls="report")
    assert [unquote(a["attrs"]["href"]) for a in links] == [report_paths[c] for c in expected]
    assert [dom.text(a) for a in links] == expected
    for a in links:  # relative, and the ":" of a case id cannot turn into a URL scheme
        assert not urlsplit(a["attrs"]["href"]).scheme and not a["attrs"]["href"].startswith("/")
    kinds = [el["attrs"]["data-kind"] for el in dom.find("td", cls="decision")]
    assert kinds == ["recall", "review", "review", "routine"]
    assert "decision-recall" in dom.find("td", cls="decision")[0]["attrs"]["class"]
    probs = [dom.text(el) for el in dom.find("td", cls="probability", data_class="malignant")]
    assert probs == [r["p_malignant"] for r in table]
    assert NOTICE in text and MODEL_INFO["model_version"] in text
    _assert_offline_html(text)


def test_worklist_refuses_links_that_leave_the_folder(tmp_path):
    results = _batch()[:1]
    for bad in ("https://example.org/r.html", "/abs/r.html", "//host/r.html", "C:\\reports\\r.html"):
        with pytest.raises(ValueError, match="relative"):
            write_worklist(results, MODEL_INFO, tmp_path, {"P003:R": bad})
    _, html_path = write_worklist(results, MODEL_INFO, tmp_path, {})  # no report: listed without a link
    assert not _Dom(html_path.read_text(encoding="utf-8")).find("a")
    # a report named after the case id: "P003:R.html" must not read as a link with the URL scheme "p003"
    _, html_path = write_worklist(results, MODEL_INFO, tmp_path, {"P003:R": "P003:R.html"})
    (link,) = _Dom(html_path.read_text(encoding="utf-8")).find("a", cls="report")
    assert not urlsplit(link["attrs"]["href"]).scheme and unquote(link["attrs"]["href"]) == "P003:R.html"


# --------------------------------------------------------------------------- headless browser

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# every host resolves to "not found" and every proxied request goes to the discard port, where nothing listens
OFFLINE_FLAGS = ("--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9")


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    reason = f"no Chromium binary found ({', '.join(CHROMIUM_NAMES)}); install it with `apt-get install chromium`"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


def _run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
           "--disable-background-networking", "--disable-extensions", f"--user-data-dir={profile}",
           *OFFLINE_FLAGS, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def _page_requests(netlog: Path) -> list[str]:
    """URLs of network requests a web page started, from Chromium's NetLog.

    A page's request has an `initiator` (its origin, "null" for a file:// page); the browser's own
    background requests (component updates, time sync, ...) are logged with initiator "not an origin"."""
    log = json.loads(netlog.read_text(encoding="utf-8"))
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in log["events"]:
        params = event.get("params") or {}
        if event["type"] == start_job and "url" in params and params.get("initiator") != "not an origin":
            if urlsplit(params["url"]).scheme not in ("file", "data"):
                urls.append(params["url"])
    return urls


def test_chromium_renders_report_offline(chromium, tmp_path):
    """Open the written report in headless Chromium with no way out to the network, and check what it shows.

    Offline: `--host-resolver-rules="MAP * ~NOTFOUND"` makes every host name unresolvable and
    `--proxy-server=127.0.0.1:9` sends every request to a closed port, so anything the page fetched from a
    server would be missing from the rendering. Chromium's own NetLog (`--log-net-log`) records every
    request that was attempted; the test asserts the page started none (the control test below shows the
    NetLog check does see a page's request). `--dump-dom` gives the DOM after load: all scans, heatmaps
    and probabilities are there and every image is a data URI. The screenshot must not be blank and must
    contain the heatmap overlays' exact colours, i.e. the embedded PNGs were decoded and painted.
    """
    result = _result()
    report = write_patient_report(result, MODEL_INFO, tmp_path / "P001_L.html")
    netlog = tmp_path / "netlog.json"
    proc = _run_chromium(chromium, tmp_path / "profile-dom", f"--log-net-log={netlog}", "--dump-dom",
                         report.as_uri())
    dom = _Dom(proc.stdout)
    imgs = dom.find("img")
    assert len(dom.find("img", cls="scan")) == 3 and len(dom.find("img", cls="heatmap")) == 2
    assert imgs and all(img["attrs"]["src"].startswith(DATA_URI_PREFIX) for img in imgs)
    assert _patient_probability_cells(dom) == {"normal": "0.1234", "benign": "0.2345", "malignant": "0.6421"}
    assert "recall: suspected malignant" in dom.text(dom.find(id="decision")[0])
    assert NOTICE in proc.stdout
    assert _page_requests(netlog) == []

    shot = tmp_path / "report.png"
    _run_chromium(chromium, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1200,1600",
                  report.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (1600, 1200, 3)
    assert pixels.astype(np.float64).var() > 0, "blank screenshot"
    painted = {tuple(c) for c in pixels.reshape(-1, 3)}
    for panel in result.panels:
        if panel.heatmap is None:
            continue
        overlay = np.asarray(Image.open(io.BytesIO(overlay_png(panel.image, panel.heatmap))).convert("RGB"))
        colours = {tuple(c) for c in overlay.reshape(-1, 3)}
        shown = len(colours & painted) / len(colours)
        assert shown > 0.9, f"only {shown:.0%} of the {panel.title} overlay colours are in the screenshot"


def test_chromium_netlog_sees_a_page_request(chromium, tmp_path):
    """Control for the offline check: the same report with its CSP removed and one external image
    added makes Chromium start a request (which fails offline), and `_page_requests` reports it."""
    text = patient_report_html(_result(), MODEL_INFO)
    text = text.replace(f'<meta http-equiv="Content-Security-Policy" content="{markupsafe.escape(CSP)}">', "")
    assert "Content-Security-Policy" not in text
    page = tmp_path / "leaky.html"
    page.write_text(text.replace("</body>", '<img src="http://breastfusion.invalid/leak.png"></body>'),
                    encoding="utf-8")
    netlog = tmp_path / "netlog.json"
    _run_chromium(chromium, tmp_path / "profile", f"--log-net-log={netlog}", "--dump-dom", page.as_uri())
    assert "http://breastfusion.invalid/leak.png" in _page_requests(netlog)
