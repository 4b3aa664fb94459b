"""Logging, configured once by the command line (`console`): stderr at the level `--verbose` /
`--quiet` choose, and a log file (`breastfusion.log`) in every run and prediction folder.

Modules log through `logging.getLogger(__name__)` (all under the "breastfusion" logger) and
never configure logging themselves; a program that imports the library keeps its own setup.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from .inference.layout import LOG_FILE

ROOT = "breastfusion"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _ConsoleFormat(logging.Formatter):
    """INFO lines as they are; warnings and errors prefixed with their level."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def level_of(verbose: bool, quiet: bool) -> int:
    return logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO


class _Console(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each line (a test runner swaps it)."""

    def __init__(self, level: int):
        super().__init__()
        self.setFormatter(_ConsoleFormat("%(message)s"))
        self.setLevel(level)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # set by StreamHandler.__init__; the property decides
        pass


@contextlib.contextmanager
def console(level: int = logging.INFO) -> Iterator[None]:
    """Within: the library's log lines on stderr from `level` up (the CLI wraps each command
    in it); INFO lines always reach the log files (`log_to`)."""
    logger = logging.getLogger(ROOT)
    handler = _Console(level)
    previous = logger.level
    logger.setLevel(min(level, logging.INFO))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


class _LogFile(logging.FileHandler):
    """A run folder's log file. When a line cannot be written (a full disk, the file size
    limit) it says so once on stderr and writes no more lines, instead of a traceback per line
    that would bury the error the command ends with (`files.StorageError`)."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, OSError):
            super().handleError(record)  # a bad log call: the usual report
            return
        self.failed = True
        sys.stderr.write(f"warning: {self.baseFilename}: cannot write the log ({exc.strerror or exc}); "
                         "log lines go to the console only\n")

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the unwritten lines still buffered: dropped, as said when they failed
            if not self.failed:
                raise


@contextlib.contextmanager
def log_to(folder: str | os.PathLike) -> Iterator[Path]:
    """Within: every INFO (and higher) line of the library is appended to FOLDER/breastfusion.log."""
    path = Path(folder) / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(ROOT)
    handler = _LogFile(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.setLevel(logging.INFO)
    previous = logger.level
    if previous == logging.NOTSET or previous > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(previous)
