"""File helpers: atomic writes (every output appears whole or not at all: temporary
sibling + os.replace) and content hashes (cache keys)."""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` if the block succeeds and is removed if not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
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


def remove_stale_temporaries(root: str | os.PathLike) -> int:
    """Delete temp files that `atomic_path` left under `root` when a process was killed
    mid-write (they never replaced a result); returns how many."""
    count = 0
    for tmp in Path(root).rglob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink()
            count += 1
    return count


def safe_name(text: str, fallback: str) -> str:
    """`text` as a file or folder name: runs of other characters than letters, digits, "_",
    "." and "-" become one "_"; `fallback` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or fallback
