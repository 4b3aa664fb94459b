"""Registry of the public-dataset adapters: one name -> one loader of manifest records.

Every adapter reads its dataset's official layout (see each module's docstring for
its conventions) and returns ``ImageRecord``s like ``ingest`` does; write them with
``records.write_manifest``. ``DEFAULT_FOLDERS`` names each dataset's folder inside a
datasets directory such as ``../shared/datasets``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..errors import BreastFusionError
from ..records import ImageRecord
from .busi import load_busi
from .cdd_cesm import load_cdd_cesm
from .mias import load_mias

ADAPTERS: dict[str, Callable[..., list[ImageRecord]]] = {
    "busi": load_busi,
    "cdd-cesm": load_cdd_cesm,
    "mias": load_mias,
}
DEFAULT_FOLDERS: dict[str, str] = {"busi": "BUSI", "cdd-cesm": "CDD-CESM", "mias": "mini-MIAS"}
_ALIASES = {"cddcesm": "cdd-cesm", "minimias": "mias", "mini-mias": "mias"}


def adapter_name(name: str) -> str:
    """Canonical adapter name ('BUSI', 'cdd_cesm', 'mini-MIAS' ... accepted); ValueError naming the choices."""
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, _ALIASES.get(key.replace("-", ""), key))
    if key not in ADAPTERS:
        raise BreastFusionError(f"unknown public dataset {name!r} (expected one of: {', '.join(ADAPTERS)})")
    return key


def load_public(name: str, root: str | os.PathLike, **options) -> list[ImageRecord]:
    """Records of public dataset `name` read from `root` (the dataset's own folder).

    `root` may also be a datasets directory holding the dataset under its usual
    folder name (``DEFAULT_FOLDERS``), e.g. ``../shared/datasets``.
    """
    key = adapter_name(name)
    root = Path(root)
    nested = root / DEFAULT_FOLDERS[key]
    if nested.is_dir():
        root = nested
    return ADAPTERS[key](root, **options)
