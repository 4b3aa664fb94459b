"""File helpers: atomic writes (every output appears whole or not at all: temporary
sibling + os.replace), content hashes (cache keys), and a full disk as one clear error.

Atomic writes make the caches and run folders safe to share: a reader finds an entry whole or
not at all, never half-written, and two processes writing the same entry end with one whole
entry (the last `os.replace` wins; both wrote the same bytes). A write that fails for lack of
space (ENOSPC, EFBIG, EDQUOT) raises `StorageError` naming the file and the reason; the
temporary file is removed and the target left as it was (docs/reliability.md, "A full disk").
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import BreastFusionError, StorageError

# errno values that mean "no room to write": a full file system, the per-process file size
# limit (RLIMIT_FSIZE, `ulimit -f`), a used-up disk quota
STORAGE_ERRNOS = frozenset(e for e in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", None)) if e is not None)
_PROBE_BYTES = 1 << 16


def storage_error(path: str | os.PathLike | None, exc: OSError) -> StorageError:
    """The one-line error for a write to `path` that failed with `exc` (one of STORAGE_ERRNOS)."""
    reason = exc.strerror or os.strerror(exc.errno)
    where = f"{path}: cannot write" if path else "cannot write a file"
    return StorageError(f"{where} ({reason}); free space and run the command again (completed work is kept)",
                        str(path or ""), reason)


def _named_cause(exc: BaseException) -> OSError | None:
    """An OSError of STORAGE_ERRNOS behind `exc`: itself, one it was raised from, or one its
    message quotes (Rust's "(os error 28)", Python's "[Errno 28]", as safetensors words it)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in STORAGE_ERRNOS:
            return seen
        seen = seen.__cause__ or seen.__context__
    quoted = re.search(r"(?:os error|Errno) (\d+)", str(exc))
    if quoted is not None and int(quoted[1]) in STORAGE_ERRNOS:
        return OSError(int(quoted[1]), os.strerror(int(quoted[1])))
    return None


def _no_room(tmp: Path) -> OSError | None:
    """After a writer failed without an errno (numpy, safetensors and torch report a short
    write in their own words): can `tmp` still grow? The OSError that says why not when it
    cannot for lack of room, else None (the failure was something else).

    One more byte fails at the file size limit (EFBIG) or on a full file system; a further
    64 KiB (past the slack of the file's last block) fails on a file system with less than
    that left (ENOSPC, EDQUOT; an EFBIG there would be the probe's own doing)."""
    try:
        with open(tmp, "ab", buffering=0) as fh:
            fh.write(b"\0")
    except OSError as exc:
        return exc if exc.errno in STORAGE_ERRNOS else None
    try:
        with open(tmp, "ab", buffering=0) as fh:
            data = memoryview(bytes(_PROBE_BYTES))
            while data:
                data = data[fh.write(data):]
            os.fsync(fh.fileno())
    except OSError as exc:
        return exc if exc.errno in STORAGE_ERRNOS - {errno.EFBIG} else None
    return None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` if the block succeeds and is removed if not.

    A block that fails for lack of room (full disk, file size limit, quota; whatever the writer
    called its failure) raises `StorageError` naming `path`; `path` is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in STORAGE_ERRNOS:
            raise storage_error(path.parent, exc) from exc
        raise
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BreastFusionError:
        raise
    except Exception as exc:
        full = _named_cause(exc) or _no_room(tmp)
        if full is not None:
            raise storage_error(path, full) from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def save_npy(path: str | os.PathLike, array: np.ndarray, dtype=np.float32) -> Path:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.asarray(array, dtype=dtype))
    return Path(path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_TEMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")  # atomic_path's ".NAME.PID.HEX.tmp"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (True when that cannot be told)."""
    if pid <= 0 or os.name != "posix":
        return pid > 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def remove_stale_temporaries(root: str | os.PathLike, unnamed_age: float = 3600.0) -> int:
    """Delete temp files that `atomic_path` left under `root` when a process was killed
    mid-write (they never replaced a result); returns how many. A temp file whose writer
    (the pid in its name) still runs is another process's write in progress and is kept;
    one without a pid in its name only once it is `unnamed_age` seconds old."""
    count = 0
    for tmp in Path(root).rglob(".*.tmp"):
        match = _TEMP_NAME.match(tmp.name)
        try:
            if not tmp.is_file():
                continue
            if match is not None and pid_alive(int(match["pid"])):
                continue
            if match is None and time.time() - tmp.stat().st_mtime < unnamed_age:
                continue
            tmp.unlink()
        except FileNotFoundError:  # its writer finished (or removed it) meanwhile
            continue
        count += 1
    return count


def safe_name(text: str, fallback: str) -> str:
    """`text` as a file or folder name: runs of other characters than letters, digits, "_",
    "." and "-" become one "_"; `fallback` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or fallback
