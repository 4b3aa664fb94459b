"""What the preprocessing and feature caches hold, and removing what is no longer wanted.

A cache folder (`train.cache_dir`, default `.cache/breastfusion`) has one entry per set of
parameters: `preprocessed/<hash>/` (preprocessed images of one image size and crop
setting) and `features/<hash>/` (one backbone's pooled features or activation maps, at one
size, stage, number of augmented copies and seed). Each entry's `key.json` names its
parameters. Entries grow with every setting tried (a 512 px activation cache of a few
hundred mammograms with 7 copies is about 5 GB), and nothing removes them on its own.
`entries` lists them with their size and when they were last used (a run rewrites or
touches an entry's key.json whenever it opens the entry); `prune` removes the chosen ones.
A removed entry is recomputed by the next run that needs it; do not prune an entry that a
running command is filling.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import BreastFusionError

KINDS = ("preprocessed", "features")
DAY = 86400.0


@dataclass(frozen=True)
class CacheEntry:
    kind: str  # "preprocessed" or "features"
    name: str  # the parameters' hash (the folder's name)
    path: Path
    files: int
    bytes: int
    newest: float  # its newest file's time, key.json's included: when it was last used (0 when empty)
    summary: str  # its parameters in a few words

    def age_days(self, now: float | None = None) -> float:
        return ((now if now is not None else time.time()) - self.newest) / DAY


def describe(kind: str, key: dict) -> str:
    """An entry's key.json in a few words (what a reader needs to tell entries apart)."""
    if not key:
        return "(no key.json)"
    if kind == "preprocessed":
        return f"{key.get('size', '?')} px, chest wall {key.get('chest_wall', '?')}, colour {key.get('colour', '?')}"
    image = key.get("image", {})
    words = [str(key.get("backbone", "?")), f"{image.get('size', '?') if isinstance(image, dict) else '?'} px"]
    stage = key.get("stage")
    words.append(f"activations to {stage} ({key.get('dtype', '?')})" if stage else "pooled features")
    if "pooling" in key:
        words.append(f"pooling {key['pooling'][0]}")
    if "feature_layer" in key:
        words.append(f"layer {key['feature_layer']}")
    words.append(f"{key.get('copies', '?')} copies, seed {key.get('seed', '?')}")
    return ", ".join(words)


def _measure(folder: Path) -> tuple[int, int, float]:
    files = size = 0
    newest = 0.0
    with os.scandir(folder) as it:
        for item in it:
            if item.is_file(follow_symlinks=False):
                st = item.stat(follow_symlinks=False)
                files, size, newest = files + 1, size + st.st_size, max(newest, st.st_mtime)
    return files, size, newest


def entries(cache_dir: str | os.PathLike) -> list[CacheEntry]:
    """Every entry of the cache folder, largest first. A missing folder has none."""
    root = Path(cache_dir)
    if root.exists() and not root.is_dir():
        raise BreastFusionError(f"{root}: not a folder (expected a cache folder such as .cache/breastfusion)")
    out = []
    for kind in KINDS:
        if not (root / kind).is_dir():
            continue
        for folder in sorted(p for p in (root / kind).iterdir() if p.is_dir()):
            try:
                key = json.loads((folder / "key.json").read_text())
            except (OSError, ValueError):
                key = {}
            files, size, newest = _measure(folder)
            out.append(CacheEntry(kind, folder.name, folder, files, size, newest, describe(kind, key)))
    return sorted(out, key=lambda e: -e.bytes)


def chosen(found: list[CacheEntry], names: Iterable[str] = (), older_than_days: float | None = None,
           now: float | None = None) -> list[CacheEntry]:
    """The entries named (by hash, or a unique start of one) and those last used more than
    `older_than_days` ago (key.json is refreshed on every use). A name that matches no entry,
    or several, is an error."""
    picked = {}
    for name in names:
        hits = [e for e in found if e.name.startswith(name)]
        if len(hits) != 1:
            known = ", ".join(e.name for e in found) or "none"
            raise BreastFusionError(f"cache entry {name!r} matches {len(hits)} entries (entries: {known})")
        picked[hits[0].path] = hits[0]
    if older_than_days is not None:
        if older_than_days < 0:
            raise BreastFusionError(f"--older-than {older_than_days}: give a number of days >= 0")
        for e in found:
            if e.age_days(now) > older_than_days:
                picked[e.path] = e
    return sorted(picked.values(), key=lambda e: -e.bytes)  # largest first, as `entries`


def prune(victims: Iterable[CacheEntry]) -> int:
    """Remove the entries; returns the bytes freed."""
    freed = 0
    for e in victims:
        shutil.rmtree(e.path, ignore_errors=True)
        freed += e.bytes
    return freed


def human_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GB"


def table(found: list[CacheEntry], now: float | None = None) -> str:
    """The entries as aligned text lines: kind, hash, size, files, last use, parameters."""
    if not found:
        return "the cache is empty"
    lines = [f"{'kind':<13}{'entry':<18}{'size':>10}{'files':>8}{'last used':>14}  parameters"]
    for e in found:
        age = f"{e.age_days(now):.1f} days ago" if e.newest else "-"
        lines.append(f"{e.kind:<13}{e.name:<18}{human_bytes(e.bytes):>10}{e.files:>8}{age:>14}  {e.summary}")
    lines.append(f"{len(found)} entries, {human_bytes(sum(e.bytes for e in found))}")
    return "\n".join(lines)
