"""`breastfusion serve`: the `predict` pipeline behind HTTP (a Starlette app, run by uvicorn).

Endpoints
    POST /predict   one study, as
                    * a zip of the study folder as the body (Content-Type application/zip,
                      application/x-zip-compressed or application/octet-stream), or
                    * multipart/form-data with file fields: DICOM or image files, zips, or both
                      (field names are free; a file's name may carry a relative folder, checked
                      like a zip member's name).
                    The study goes through what `breastfusion predict FOLDER` does (ingest, then
                    `predict_batch`), and the answer is the JSON `predict` writes to
                    predictions.json, plus "reports": {case id: the patient's self-contained
                    HTML report}. Query: ``reports=0`` leaves the reports out; ``format=zip``
                    answers the whole prediction folder `predict` writes (predictions.json, CSV
                    tables, reports, heatmaps, worklist) as a zip instead.
    GET /health     model name, version, bundle and the queue.

Errors are text/plain, one line: 400 malformed upload (not a zip, a corrupt or unsafe archive,
a bad query), 408 upload not finished in time, 413 too large (body, unpacked size, number of
files), 415 unsupported Content-Type, 422 a study that cannot be predicted (nothing usable in
it; the project's one-line error messages, patient ids masked), 503 busy (with Retry-After),
500 a bug (logged with its traceback; the answer says nothing more).

Limits (`Limits`)
    The body is refused (413) from its Content-Length before any of it is read, and its bytes
    are counted as they arrive (a client may send no length, or a false one): reading stops at
    the limit. Zips are checked before anything is extracted: members with an absolute path,
    ".." or a drive letter (zip slip), symbolic links and encrypted members are refused; the
    number of files and the total unpacked size are capped (zip bomb), the declared sizes first
    and then the bytes actually written. Members are written one by one as regular files, never
    through `ZipFile.extract`. An upload must finish within `upload_timeout_s` (a stalled client
    would otherwise hold a queue place).

Queue
    One study is predicted at a time (the fold networks are shared and Grad-CAM hooks them;
    torch already uses every core for one study), in a worker thread so that the server keeps
    answering. At most `max_queue` more wait (their uploads are read meanwhile); beyond that a
    request is answered 503 "busy: N studies queued; retry later" before its body is read.

Files
    Every file of a request (the upload, the unpacked study, the manifest, the preprocessing
    cache, the prediction folder) is written inside one temporary folder (`tempfile`, mode 0700)
    under `tmp_root`, removed before the answer is sent, whatever happened. Nothing is kept
    between requests; only the model (`load_bundle`, once, at start) is shared. A server killed
    by SIGKILL leaves its request folders behind (names start with "breastfusion-request-").
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import stat
import tempfile
import time
import zipfile
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from . import __version__
from .errors import BreastFusionError, StorageError
from .files import STORAGE_ERRNOS, safe_name
from .ingest.folder import ingest_folder, write_ingest
from .predict.bundle import Bundle, load_bundle
from .predict.run import predict_batch, runtime_ready
from .records import read_manifest

log = logging.getLogger(__name__)

MB = 1 << 20
ZIP_TYPES = ("application/zip", "application/x-zip-compressed", "application/octet-stream")
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members; an empty zip
REQUEST_PREFIX = "breastfusion-request-"
MAX_DEPTH = 32  # folders in a member's path
COPY_CHUNK = MB


@dataclass(frozen=True)
class Limits:
    max_upload_mb: float = 512  # request body
    max_unpacked_mb: float = 2048  # every file of the study, unpacked
    max_files: int = 2000  # zip members and uploaded files together
    max_queue: int = 4  # studies waiting behind the one being predicted
    upload_timeout_s: float = 300

    @property
    def upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    @property
    def unpacked_bytes(self) -> int:
        return int(self.max_unpacked_mb * MB)


class Refused(Exception):
    """A request answered with an HTTP error `status` and one line of reason."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None):
        super().__init__(reason)
        self.status, self.headers = status, headers or {}


def _line(status: int, reason: str, headers: dict[str, str] | None = None) -> PlainTextResponse:
    text = " ".join(reason.split())[:500]
    return PlainTextResponse(text + "\n", status_code=status, headers=headers)


def _mb(n: float) -> str:
    return f"{n / MB:.3g} MB"


# -- the body ----------------------------------------------------------------------------------


async def _body(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body, chunk by chunk: refused from its Content-Length before a byte is read,
    and as soon as the bytes received pass `limit` (no length, chunked, or a false length)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise Refused(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise Refused(413, f"upload of {_mb(int(declared))} refused: the limit is {_mb(limit)}")
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise Refused(413, f"upload refused: more than the limit of {_mb(limit)} (stopped reading there)")
            yield chunk
    except ClientDisconnect:
        raise Refused(400, "the client went away during the upload") from None


def _check_name(name: str, what: str) -> list[str]:
    """The parts of a relative path given by the client (a zip member, a multipart file name);
    absolute paths, drive letters, '..' and NUL are refused. Names are never echoed (they
    may carry identities): `what` says which member it is."""
    if "\x00" in name:
        raise Refused(400, f"{what}: NUL character in its name; refused")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"[A-Za-z]:", norm):
        raise Refused(400, f"{what}: absolute path; refused")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Refused(400, f"{what}: path with '..' (outside the archive); refused")
    if not parts:
        raise Refused(400, f"{what}: empty name; refused")
    if len(parts) > MAX_DEPTH:
        raise Refused(400, f"{what}: more than {MAX_DEPTH} folders deep; refused")
    return parts


@dataclass
class Upload:
    """A file as received: where it lies in the request folder, and the name the client gave."""

    path: Path
    name: str
    body: bool = False  # the whole body (declared a zip), not a multipart file


class _Multipart:
    """python-multipart callbacks that write each file part straight into the request folder
    (Starlette's own form parser spools big parts to the system's temporary folder)."""

    def __init__(self, folder: Path, max_files: int):
        self.folder, self.max_files = folder, max_files
        self.files: list[Upload] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._field = self._value = b""
        self._out = None

    def callbacks(self) -> dict:
        return {"on_part_begin": self.begin, "on_part_data": self.data, "on_part_end": self.end,
                "on_header_field": self.header_field, "on_header_value": self.header_value,
                "on_header_end": self.header_end, "on_headers_finished": self.headers_finished}

    def begin(self) -> None:
        self._headers, self._field, self._value = [], b"", b""

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def header_end(self) -> None:
        self._headers.append((self._field.lower(), self._value))
        self._field = self._value = b""

    def headers_finished(self) -> None:
        disposition = dict(self._headers).get(b"content-disposition", b"")
        _, options = parse_options_header(disposition)
        if b"filename" not in options:  # a plain form field: not used
            return
        if len(self.files) >= self.max_files:
            raise Refused(413, f"more than {self.max_files} files in the upload")
        name = options[b"filename"].decode("utf-8", "replace")
        path = self.folder / f"{len(self.files):05d}"
        self.files.append(Upload(path, name))
        self._out = open(path, "xb")  # noqa: SIM115 - closed in end() or close()

    def data(self, data: bytes, start: int, end: int) -> None:
        if self._out is not None:
            self._out.write(data[start:end])

    def end(self) -> None:
        self.close()

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


async def receive_upload(request: Request, work: Path, limits: Limits) -> list[Upload]:
    """Read the body into `work/upload/`: one zip (a zip body), or the file parts (multipart)."""
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    kind = kind.decode("latin-1").lower()
    folder = work / "upload"
    folder.mkdir()
    body = _body(request, limits.upload_bytes)
    if kind in ZIP_TYPES:
        path = folder / "study.zip"
        with open(path, "xb") as out:
            async for chunk in body:
                out.write(chunk)
        if path.stat().st_size == 0:
            raise Refused(400, "empty upload")
        return [Upload(path, "study.zip", body=True)]
    if kind != "multipart/form-data":
        raise Refused(415, f"Content-Type {kind or '(none)'} not accepted: send application/zip or "
                           "multipart/form-data")
    if b"boundary" not in options:
        raise Refused(400, "multipart upload without a boundary")
    parts = _Multipart(folder, limits.max_files)
    try:
        parser = MultipartParser(options[b"boundary"], parts.callbacks())
        async for chunk in body:
            parser.write(chunk)
        parser.finalize()
    except FormParserError:
        raise Refused(400, "malformed multipart body") from None
    finally:
        parts.close()
    if not parts.files:
        raise Refused(400, "no file in the multipart upload")
    return parts.files


# -- unpacking ---------------------------------------------------------------------------------


class _Budget:
    """Files and bytes left for the unpacked study."""

    def __init__(self, limits: Limits):
        self.files, self.bytes, self.limits = limits.max_files, limits.unpacked_bytes, limits

    def check_files(self, n: int) -> None:
        if n > self.files:
            raise Refused(413, f"more than {self.limits.max_files} files in the upload")

    def take_files(self, n: int) -> None:
        self.files -= n
        if self.files < 0:
            raise Refused(413, f"more than {self.limits.max_files} files in the upload")

    def take_bytes(self, n: int) -> None:
        self.bytes -= n
        if self.bytes < 0:
            raise Refused(413, f"the upload unpacks to more than the limit of {_mb(self.limits.unpacked_bytes)}")


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) in ZIP_MAGIC


def _extract(archive: Path, dest: Path, budget: _Budget, label: str) -> None:
    """Every member of `archive` into `dest`, as regular files, after checking every name,
    type and the declared sizes (see the module docstring)."""
    try:
        with open(archive, "rb") as fh:  # the count in the end record, before the directory is read
            end = zipfile._EndRecData(fh)  # (millions of tiny entries would fill the memory)
        if end is not None:
            budget.check_files(int(end[zipfile._ECD_ENTRIES_TOTAL]))
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        raise Refused(400, f"{label}: not a readable zip archive") from None
    with zf:
        infos = zf.infolist()
        budget.take_files(sum(not i.is_dir() for i in infos))
        budget.take_bytes(sum(i.file_size for i in infos if not i.is_dir()))  # declared: before writing
        targets = []
        for k, info in enumerate(infos, start=1):
            what = f"{label} member {k}"
            parts = _check_name(info.filename, what)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise Refused(400, f"{what}: a symbolic link; refused")
            if info.flag_bits & 0x1:
                raise Refused(400, f"{what}: encrypted; refused")
            targets.append((info, dest.joinpath(*parts)))
        budget.bytes += sum(i.file_size for i in infos if not i.is_dir())  # now counted as written
        for k, (info, target) in enumerate(targets, start=1):
            what = f"{label} member {k}"
            try:
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "xb") as out:
                    while chunk := src.read(COPY_CHUNK):
                        budget.take_bytes(len(chunk))
                        out.write(chunk)
            except FileExistsError:
                raise Refused(400, f"{what}: a second file of the same name; refused") from None
            except NotImplementedError:
                raise Refused(400, f"{what}: compression method not supported") from None
            except (zipfile.BadZipFile, zlib.error, EOFError):
                raise Refused(400, f"{label}: corrupt zip archive (at member {k})") from None
            except OSError as exc:
                if isinstance(exc, StorageError):
                    raise
                raise Refused(400, f"{what}: cannot be stored ({exc.strerror or type(exc).__name__})") from None


def unpack(uploads: list[Upload], study: Path, limits: Limits) -> None:
    """The uploaded files into the study folder: zips unpacked (a lone zip at the study's root,
    several each in its own subfolder), other files moved in under their checked names."""
    study.mkdir()
    budget = _Budget(limits)
    zips = [u for u in uploads if _is_zip(u.path)]
    for k, up in enumerate(uploads, start=1):
        what = f"uploaded file {k}"
        if up in zips:
            dest = study if len(zips) == 1 else study / f"zip_{k:05d}"
            _extract(up.path, dest, budget, what if len(uploads) > 1 else "the zip")
            up.path.unlink()
            continue
        if up.body:  # declared a zip, and it is not one
            raise Refused(400, "the upload is not a zip archive")
        budget.take_files(1)
        budget.take_bytes(up.path.stat().st_size)
        target = study.joinpath(*_check_name(up.name or f"file_{k:05d}", what))
        if target.exists():
            raise Refused(400, f"{what}: a second file of the same name; refused")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(up.path, target)


# -- the service -------------------------------------------------------------------------------


def _masked(text: str, ids: set[str], work: Path) -> str:
    """One line for a client: the request folder left out, patient ids replaced by '<patient>'."""
    text = text.replace(f"{work}{os.sep}", "").replace(str(work), "")
    for pid in sorted(ids, key=len, reverse=True):
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(pid)}(?![A-Za-z0-9])", "<patient>", text)
    return " ".join(text.split())


def _flag(value: str | None, default: bool, name: str) -> bool:
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise Refused(400, f"query parameter {name}: {value!r} is not 0/1/true/false")


class Service:
    """The model, loaded once, and the queue in front of it; `app` serves it."""

    def __init__(self, bundle: Bundle, limits: Limits, tmp_root: Path | None, heatmaps: bool, device: str,
                 pseudonymise_salt: str | None, command: str, runtime: str = "torch"):
        self.bundle, self.limits, self.device, self.runtime = bundle, limits, device, runtime
        self.heatmaps = runtime_ready(bundle, runtime, heatmaps)  # graphs loaded now; no Grad-CAM off PyTorch
        self.tmp_root = tmp_root
        self.salt = pseudonymise_salt
        self.command = command or f"breastfusion serve --model {bundle.root.name}"
        self.pending = 0  # studies admitted: the one predicted and those waiting
        self.served = 0
        self._mean_s: float | None = None  # running mean of a study's prediction time (Retry-After)
        self._model: anyio.Lock | None = None

    # -- what runs in the worker thread (tests replace predict_study)

    def predict_study(self, study: Path, work: Path, ids: set[str]) -> Path:
        """`breastfusion predict STUDY` into work/out (cache in work/cache); returns work/out."""
        result = ingest_folder(study, pseudonymise_salt=self.salt)
        ids.update(r.patient_id for r in result.records)
        if not result.records:
            if not result.skipped:
                raise Refused(422, "the upload holds no file")
            raise Refused(422, f"no usable DICOM or image file in the upload ({len(result.skipped)} file(s) "
                               f"skipped; first: {result.skipped[0][1]})")
        manifest_csv, _ = write_ingest(result, work / "manifest.csv")
        manifest = read_manifest(manifest_csv, require_labels=False)
        out = work / "out"
        predict_batch(manifest, self.bundle, out, cache_dir=work / "cache", heatmaps=self.heatmaps,
                      device=self.device, progress=False, save_arrays=False, skipped_at_ingest=result.skipped,
                      command=f"{self.command} (POST /predict)", runtime=self.runtime)
        return out

    @staticmethod
    def answer(out: Path, fmt: str, reports: bool) -> Response:
        if fmt == "zip":
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
                for file in sorted(out.rglob("*")):
                    if file.is_file():
                        zf.write(file, file.relative_to(out).as_posix())
            return Response(buffer.getvalue(), media_type="application/zip",
                            headers={"Content-Disposition": 'attachment; filename="prediction.zip"'})
        summary = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
        if reports:
            summary["reports"] = {}
            for row in summary.get("patients", []):
                file = out / "reports" / f"{safe_name(row['case_id'], 'case')}.html"
                if file.is_file():
                    summary["reports"][row["case_id"]] = file.read_text(encoding="utf-8")
        return Response(json.dumps(summary), media_type="application/json")

    # -- HTTP

    def retry_after(self) -> int:
        return max(1, min(3600, math.ceil((self._mean_s or 10.0) * max(self.pending, 1))))

    async def health(self, request: Request) -> Response:
        b = self.bundle
        return JSONResponse({"status": "ok", "model": b.config.name, "version": b.version, "bundle": b.root.name,
                             "breastfusion": __version__, "classes": list(b.meta.classes),
                             "folds": len(b.meta.folds), "runtime": self.runtime, "heatmaps": self.heatmaps,
                             "queued": self.pending,
                             "max_queue": self.limits.max_queue, "max_upload_mb": self.limits.max_upload_mb,
                             "served": self.served})

    async def predict(self, request: Request) -> Response:
        try:
            fmt = request.query_params.get("format", "json")
            if fmt not in ("json", "zip"):
                raise Refused(400, f"query parameter format: {fmt!r} is not json or zip")
            reports = _flag(request.query_params.get("reports"), True, "reports")
        except Refused as exc:
            return _line(exc.status, str(exc))
        if self.pending > self.limits.max_queue:  # the one predicted + max_queue waiting
            return _line(503, f"busy: {self.pending} studies queued; retry later",
                         {"Retry-After": str(self.retry_after())})
        self.pending += 1
        work: Path | None = None
        ids: set[str] = set()
        try:
            with tempfile.TemporaryDirectory(prefix=REQUEST_PREFIX, dir=self.tmp_root) as tmp:
                work = Path(tmp)
                try:
                    with anyio.fail_after(self.limits.upload_timeout_s):
                        uploads = await receive_upload(request, work, self.limits)
                except TimeoutError:
                    raise Refused(408, f"upload not finished within {self.limits.upload_timeout_s:g} s") from None
                study = work / "study"
                await anyio.to_thread.run_sync(unpack, uploads, study, self.limits)
                async with self._lock():
                    started = time.monotonic()
                    out = await anyio.to_thread.run_sync(self.predict_study, study, work, ids)
                    taken = time.monotonic() - started
                    self._mean_s = taken if self._mean_s is None else 0.8 * self._mean_s + 0.2 * taken
                response = await anyio.to_thread.run_sync(self.answer, out, fmt, reports)
            self.served += 1
            return response
        except Refused as exc:
            return _line(exc.status, _masked(str(exc), ids, work) if work else str(exc), exc.headers)
        except StorageError as exc:
            log.error("request not served: %s", exc)
            return _line(507, "no room on the server to unpack and predict the study")
        except BreastFusionError as exc:
            return _line(422, _masked(str(exc), ids, work) if work else str(exc))
        except OSError as exc:
            if exc.errno not in STORAGE_ERRNOS:
                log.exception("request failed")
                return _line(500, "internal error (logged on the server); the study was not predicted")
            log.error("request not served: %s", exc)
            return _line(507, "no room on the server to unpack and predict the study")
        except Exception:  # noqa: BLE001 - a bug: logged whole, one line to the client
            log.exception("request failed")
            return _line(500, "internal error (logged on the server); the study was not predicted")
        finally:
            self.pending -= 1

    def _lock(self) -> anyio.Lock:
        if self._model is None:  # made in the event loop that serves (see lifespan)
            self._model = anyio.Lock()
        return self._model

    @asynccontextmanager
    async def lifespan(self, app):
        self._model = anyio.Lock()
        yield


def create_app(bundle: str | os.PathLike | Bundle, *, limits: Limits | None = None,
               tmp_root: str | os.PathLike | None = None, heatmaps: bool = True, device: str = "auto",
               pseudonymise_salt: str | None = None, command: str = "", runtime: str = "torch") -> Starlette:
    """The service's ASGI app. `bundle`: a bundle folder (loaded now, once) or a loaded Bundle.
    `tmp_root`: where the per-request folders go (default: the system's temporary folder).
    `runtime`: as `predict --runtime` (the ONNX Runtime sessions are made now, once).
    The Service is `app.state.service`."""
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle, networks=runtime == "torch")
    root = None
    if tmp_root is not None:
        root = Path(tmp_root)
        root.mkdir(parents=True, exist_ok=True)
    service = Service(bundle, limits or Limits(), root, heatmaps, device, pseudonymise_salt, command, runtime)
    app = Starlette(routes=[Route("/predict", service.predict, methods=["POST"]),
                            Route("/health", service.health, methods=["GET"])],
                    lifespan=service.lifespan)
    app.state.service = service
    return app
