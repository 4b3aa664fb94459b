"""`breastfusion serve` (serve.py): a study in, predict's JSON out; malformed, oversized and unsafe
uploads refused with one line; the queue's busy answer; no request file left behind."""

import io
import json
import stat
import threading
import warnings
import zipfile

import anyio
import numpy as np
import pytest
from click.testing import CliRunner

from breastfusion.cli import main
from breastfusion.config import BackboneConfig, CVConfig, RunConfig, TrainConfig
from breastfusion.experiment import run_experiment
from breastfusion.predict.bundle import export_bundle, load_bundle
from breastfusion.records import read_manifest
from breastfusion.serve import Limits, create_app

from conftest import tiny_model_config, write_tiny_cohort
from dicom_files import PHI_MARKERS, US_SOP, write_dicom

with warnings.catch_warnings():  # starlette 1.10 prefers httpx2 to httpx for its test client
    warnings.filterwarnings("ignore", message=".*httpx2")
    from starlette.testclient import TestClient

ZIP = {"Content-Type": "application/zip"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny 3-fold MM bundle (as test_predict's), loaded once, and a DICOM study of one breast."""
    tmp = tmp_path_factory.mktemp("serve")
    model = tiny_model_config(modalities=["MG", "US"],
                              backbone=BackboneConfig(name="resnet18", weights="none", frozen="all", image_size=32))
    train = TrainConfig(mode="cached", epochs=2, batch_size=8, feature_copies=1, cache_dir=str(tmp / "cache"))
    cfg = RunConfig(name="MM", model=model, train=train, cv=CVConfig(folds=3, test_folds=1))
    run_experiment(read_manifest(write_tiny_cohort(tmp / "data", n_cases=12)), [cfg], tmp / "run", progress=False)
    bundle_dir = export_bundle(tmp / "run" / "rows" / "MM", tmp / "bundle")
    rng = np.random.default_rng(5)
    study = tmp / "study"
    for view in ("CC", "MLO"):
        write_dicom(study / f"{view.lower()}.dcm", (rng.random((40, 40)) * 4000).astype(np.uint16),
                    patient="NEW-1", ImageLaterality="R", ViewPosition=view)
    for k in range(2):
        write_dicom(study / f"us{k}.dcm", (rng.random((40, 40)) * 255).astype(np.uint8), sop_class=US_SOP,
                    modality="US", patient="NEW-1", Laterality="R")
    return bundle_dir, load_bundle(bundle_dir), study, tmp


def _zip(members: dict[str, bytes], links: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            if name in links:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, data, zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def _study_zip(study) -> bytes:
    return _zip({f.name: f.read_bytes() for f in sorted(study.iterdir())})


def _one_line(response) -> str:
    text = response.text
    assert text.endswith("\n") and text.count("\n") == 1 and len(text) < 600, text
    assert response.headers["content-type"].startswith("text/plain")
    return text.strip()


@pytest.fixture
def service(served, tmp_path):
    """A factory: the app (on the loaded bundle) under a TestClient, with its temporary root."""
    _, bundle, _, _ = served
    roots = []

    def make(**limits):
        root = tmp_path / f"tmp{len(roots)}"
        app = create_app(bundle, limits=Limits(**limits), tmp_root=root, heatmaps=False)
        roots.append(root)
        return app, root

    yield make
    for root in roots:  # nothing from any request is left behind
        assert not list(root.iterdir()), list(root.iterdir())


def test_a_zipped_dicom_study_gets_the_json_predict_writes(served, service, tmp_path):
    bundle_dir, _, study, _ = served
    app, root = service()
    with TestClient(app) as client:
        health = client.get("/health").json()
        assert health["model"] == "MM" and health["status"] == "ok" and health["queued"] == 0
        response = client.post("/predict", content=_study_zip(study), headers=ZIP)
        assert response.status_code == 200, response.text
        assert not list(root.iterdir())
        # the same files as multipart, without reports
        files = [("files", (f.name, f.read_bytes(), "application/dicom")) for f in sorted(study.iterdir())]
        parts = client.post("/predict?reports=0", files=files)
        assert parts.status_code == 200, parts.text
        folder = client.post("/predict?format=zip", content=_study_zip(study), headers=ZIP)
        assert folder.status_code == 200 and folder.headers["content-type"] == "application/zip"
    got = response.json()
    out = CliRunner().invoke(main, ["predict", str(study), "--model", str(bundle_dir), "-o", str(tmp_path / "pred"),
                                    "--cache-dir", str(tmp_path / "cache"), "--no-heatmaps"])
    assert out.exit_code == 0, out.output
    want = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert set(got) == set(want) | {"reports"}
    for key in set(want) - {"provenance"}:
        assert got[key] == want[key], key
    assert got["patients"][0]["case_id"] == "NEW-1:R" and len(got["instances"]) == 2
    assert got["provenance"]["command"].endswith("(POST /predict)")
    assert "not a medical device" in got["reports"]["NEW-1:R"].lower()
    assert {k: v for k, v in parts.json().items() if k != "provenance"} == \
        {k: v for k, v in got.items() if k not in ("provenance", "reports")}
    with zipfile.ZipFile(io.BytesIO(folder.content)) as zf:
        names = set(zf.namelist())
    assert {"predictions.json", "predictions.csv", "instances.csv", "worklist.html", "reports/NEW-1_R.html"} <= names
    for text in (response.text, parts.text):
        assert not [m for m in PHI_MARKERS if m in text]


def test_the_service_on_onnx_runtime_answers_what_pytorch_answers(served, tmp_path):
    import shutil

    from breastfusion.predict.onnx import export_onnx

    bundle_dir, bundle, study, _ = served
    onnx_dir = shutil.copytree(bundle_dir, tmp_path / "bundle")
    export_onnx(onnx_dir)
    answers = {}
    for runtime, model in (("torch", bundle), ("onnx", onnx_dir)):
        root = tmp_path / f"tmp-{runtime}"
        app = create_app(model, tmp_root=root, heatmaps=True, runtime=runtime)
        with TestClient(app) as client:
            health = client.get("/health").json()
            assert health["runtime"] == runtime and health["heatmaps"] == (runtime == "torch")
            response = client.post("/predict?reports=0", content=_study_zip(study), headers=ZIP)
            assert response.status_code == 200, response.text
        assert not list(root.iterdir())
        answers[runtime] = response.json()
    torch_rows, onnx_rows = answers["torch"]["patients"], answers["onnx"]["patients"]
    assert [r["case_id"] for r in onnx_rows] == [r["case_id"] for r in torch_rows]
    for want, got in zip(torch_rows, onnx_rows, strict=True):
        for key in ("p_normal", "p_benign", "p_malignant"):
            assert abs(got[key] - want[key]) <= 1e-4, (key, got[key], want[key])
        assert got["decision"] == want["decision"]
    assert answers["onnx"]["model"]["runtime"].startswith("ONNX Runtime") and "runtime" not in answers["torch"]["model"]


def test_malformed_and_unsafe_uploads_get_a_4xx_with_one_line(served, service):
    _, _, study, _ = served
    dicom = (study / "cc.dcm").read_bytes()
    app, root = service()
    with TestClient(app) as client:
        def refused(status, fragment, **request):
            response = client.post("/predict", **request)
            assert response.status_code == status, response.text
            line = _one_line(response)
            assert fragment in line, line
            assert not list(root.iterdir())  # the request's folder is gone, after failures too
            assert not [m for m in PHI_MARKERS if m in line]
            return line

        refused(400, "not a zip archive", content=b"this is not a zip", headers=ZIP)
        refused(400, "empty upload", content=b"", headers=ZIP)
        refused(415, "Content-Type text/plain not accepted", content=b"hello", headers={"Content-Type": "text/plain"})
        refused(400, "not a readable zip archive", content=b"PK\x03\x04" + b"\0" * 64, headers=ZIP)
        multipart = {"Content-Type": "multipart/form-data; boundary=xyz"}
        refused(400, "malformed multipart body", content=b"--wrong\r\ngarbage", headers=multipart)
        refused(400, "no file in the multipart upload", content=b"--xyz\r\ngarbage", headers=multipart)
        refused(400, "format", params={"format": "xml"}, content=_zip({"a.dcm": dicom}), headers=ZIP)
        # zip slip, absolute paths, links: refused before anything is written
        refused(400, "'..'", content=_zip({"ok.dcm": dicom, "../../evil.dcm": dicom}), headers=ZIP)
        refused(400, "absolute path", content=_zip({"/tmp/evil.dcm": dicom}), headers=ZIP)
        refused(400, "'..'", files=[("f", ("../evil.dcm", dicom))])
        refused(400, "symbolic link", content=_zip({"cc.dcm": dicom, "link": b"/etc/passwd"}, links=("link",)),
                headers=ZIP)
        assert not (root.parent / "evil.dcm").exists() and not (root / "evil.dcm").exists()
        # nothing usable, a corrupt DICOM file: 422, no identifying value in the reason
        refused(422, "no usable DICOM or image file", content=_zip({"notes.txt": b"hello"}), headers=ZIP)
        corrupt = dicom[:200] + b"\xff" * 50
        line = refused(422, "no usable DICOM or image file", files=[("f", ("cc.dcm", corrupt))])
        assert "NEW-1" not in line
        refused(422, "the upload holds no file", content=_zip({"empty/": b""}), headers=ZIP)


def _asgi_post(app, chunks, headers: dict[str, str], stall: bool = False):
    """POST /predict straight through ASGI, as a server does it: one body chunk per `receive`
    (starlette's TestClient reads a streamed body whole before the app sees it); `stall`: the
    client sends nothing more after `chunks`."""
    messages = []

    async def receive():
        chunk = next(chunks, None)
        if chunk is None and stall:
            await anyio.sleep(60)
        return {"type": "http.request", "body": chunk or b"", "more_body": chunk is not None}

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    anyio.run(app, scope, receive, send)
    return messages[0]["status"], b"".join(m.get("body", b"") for m in messages[1:]).decode()


def test_oversized_uploads_are_refused_before_they_are_read_whole(service):
    app, root = service(max_upload_mb=0.05, max_unpacked_mb=0.5, max_files=3)
    sent = []

    def chunks(n=100, size=16 * 1024):
        for k in range(n):
            sent.append(k)
            yield b"\0" * size

    # a declared length over the limit: refused before a byte is read
    status, text = _asgi_post(app, chunks(), {**ZIP, "Content-Length": str(10**9)})
    assert status == 413 and text == "upload of 954 MB refused: the limit is 0.05 MB\n" and sent == []
    # no length (chunked), or a false one: reading stops at the limit (0.05 MB: the 4th chunk of 16 kB)
    for headers in (ZIP, {**ZIP, "Content-Length": "1000"}):
        sent.clear()
        status, text = _asgi_post(app, chunks(), headers)
        assert status == 413 and "stopped reading" in text and len(sent) == 4, (text, len(sent))
        assert not list(root.iterdir())
    # a client that stops sending holds its queue place for upload_timeout_s at most
    app.state.service.limits = Limits(upload_timeout_s=0.2)
    status, text = _asgi_post(app, iter([b"PK"]), ZIP, stall=True)
    assert (status, text) == (408, "upload not finished within 0.2 s\n")
    app.state.service.limits = Limits(max_upload_mb=0.05, max_unpacked_mb=0.5, max_files=3)
    with TestClient(app) as client:
        # a zip bomb: 8 MB of zeros in a few kB
        response = client.post("/predict", content=_zip({"bomb.dcm": b"\0" * (8 << 20)}), headers=ZIP)
        assert response.status_code == 413 and "unpacks to more than" in _one_line(response)
        response = client.post("/predict", content=_zip({f"{k}.dcm": b"x" for k in range(4)}), headers=ZIP)
        assert response.status_code == 413 and "more than 3 files" in _one_line(response)
        files = [("f", (f"{k}.dcm", b"x")) for k in range(4)]
        response = client.post("/predict", files=files)
        assert response.status_code == 413 and "more than 3 files" in _one_line(response)


def test_beyond_the_queue_the_answer_is_busy(served, service):
    app, root = service(max_queue=1)
    svc = app.state.service
    entered, release = threading.Event(), threading.Event()

    def blocked(study, work, ids):  # the model stays busy until released
        entered.set()
        assert release.wait(30)
        out = work / "out"
        out.mkdir()
        (out / "predictions.json").write_text(json.dumps({"patients": [], "files": len(list(study.iterdir()))}))
        return out

    svc.predict_study = blocked
    body = _zip({"a.dcm": b"a"})
    with TestClient(app) as client:
        answers = []
        post = lambda: answers.append(client.post("/predict", content=body, headers=ZIP))  # noqa: E731
        first = threading.Thread(target=post)
        first.start()
        assert entered.wait(30)
        second = threading.Thread(target=post)  # waits behind the first
        second.start()
        for _ in range(3000):
            if svc.pending == 2:
                break
            threading.Event().wait(0.01)
        assert client.get("/health").json()["queued"] == 2
        busy = client.post("/predict", content=body, headers=ZIP)
        assert busy.status_code == 503 and _one_line(busy) == "busy: 2 studies queued; retry later"
        assert int(busy.headers["Retry-After"]) >= 1
        release.set()
        first.join(30)
        second.join(30)
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].json() == {"patients": [], "files": 1, "reports": {}}
    assert svc.pending == 0 and not list(root.iterdir())


def test_serve_binds_this_machine_only_by_default(monkeypatch, served):
    """The CLI builds the app once and hands it to uvicorn on 127.0.0.1."""
    import uvicorn

    bundle_dir, bundle, _, _ = served
    calls = {}
    monkeypatch.setattr("breastfusion.serve.load_bundle", lambda path, networks=True: bundle)  # loaded once already
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.update(kw, app=app))
    out = CliRunner().invoke(main, ["serve", "--model", str(bundle_dir), "--max-queue", "2"])
    assert out.exit_code == 0, out.output
    assert calls["host"] == "127.0.0.1" and calls["port"] == 8000
    assert calls["app"].state.service.limits.max_queue == 2
