"""One writer per run folder: `RunLock(folder)` holds FOLDER/.breastfusion.lock while a command
writes there, so that a second command started on the same folder is refused at once with the
holder's name instead of mixing its files with the first one's.

The lock is an exclusive `flock` on the lock file, which the kernel releases when the holding
process ends, however it ends (kill -9 included): a lock file left by a dead process is not a
lock, and the next command takes it over (with a warning naming the dead holder). The file
holds the holder's pid, host, command and start time, for the message a refused command
prints. Caches are not locked: their entries are written atomically (files.atomic_path), so any
number of processes can fill one cache at once.

Where `fcntl` does not exist (Windows), the lock file is created exclusively instead, and one
left by a dead process has to be deleted by hand (the message says so).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from .errors import RunLockedError
from .files import STORAGE_ERRNOS, storage_error

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

log = logging.getLogger(__name__)

LOCK_FILE = ".breastfusion.lock"


def _describe(holder: dict) -> str:
    """'pid 123 (command ..., since ...)' from a lock file's contents."""
    pid = holder.get("pid", "?")
    host = holder.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    details = ", ".join(f"{k} {holder[v]}" for k, v in (("command", "command"), ("since", "started"))
                        if holder.get(v))
    return f"pid {pid}{where}" + (f" ({details})" if details else "")


def _parse(text: str) -> dict:
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


class RunLock:
    """`with RunLock(folder, command):` the calling process is the only one writing into
    `folder` (created if missing); a live holder elsewhere raises `RunLockedError`."""

    def __init__(self, folder: str | os.PathLike, command: str = ""):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.command = command or "(python API)"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _record(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()

    def _refuse(self, holder: dict) -> RunLockedError:
        return RunLockedError(f"{self.folder}: in use by {_describe(holder)}; wait for it to finish or stop it, "
                              "or write to another folder")

    def acquire(self) -> RunLock:
        if self.held:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover - Windows
            return self._acquire_exclusive()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise self._refuse(holder) from None
            except BaseException:
                os.close(fd)
                raise
            try:  # a holder that was releasing may have removed the file between open and flock
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _parse(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))
        if previous:
            log.warning("%s: taking over the lock of %s, which is no longer running", self.folder,
                        _describe(previous))
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._record(), 0)
        except OSError as exc:
            os.close(fd)
            if exc.errno in STORAGE_ERRNOS:
                raise storage_error(self.path, exc) from exc
            raise
        self._fd = fd
        return self

    def _read(self, fd: int) -> dict:
        """The holder's record (it writes it just after locking: read twice if empty)."""
        for _ in range(3):
            holder = _parse(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))
            if holder:
                return holder
            time.sleep(0.05)
        return {}

    def _acquire_exclusive(self) -> RunLock:  # pragma: no cover - Windows
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _parse(self.path.read_text(encoding="utf-8", errors="replace"))
            raise RunLockedError(f"{self.folder}: in use by {_describe(holder)}; if that process no longer "
                                 f"runs, delete {self.path}") from None
        os.write(fd, self._record())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink()  # still locked: nobody else can have taken it in between
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)  # releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

