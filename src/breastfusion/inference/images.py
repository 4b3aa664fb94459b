"""The images a model sees: preprocessed at each modality's input size, and screened.

Training, prediction and explanation read images the same way: through an `ImageSource`
(preprocessing cache per modality, see preprocess/pipeline.py) built from the run config,
after `screen` has preprocessed each image once and set aside the ones preprocessing
refuses (`without_failed` then drops or masks them in the instances).
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

from ..config import RunConfig
from ..errors import InputImageError
from ..preprocess.mammo import NOTES
from ..preprocess.pipeline import ImageSource, Preprocessor
from ..records import ImageRecord
from .instances import Instance


def image_source(cfg: RunConfig, cache_dir: str | os.PathLike | None = None) -> ImageSource:
    """The preprocessed images a config's model sees, each modality at its backbone's input
    size (cached in `cache_dir`, default the config's)."""
    p = cfg.preprocess
    pre = Preprocessor(enabled=p.enabled, chest_wall=p.chest_wall, colour=p.colour, us_overlays=p.us_overlays)
    sizes = {m: bb.image_size for m, bb in cfg.model.backbones().items()}
    return ImageSource.sized(cache_dir or cfg.train.cache_dir, pre, sizes)


@dataclass
class Screening:
    """What preprocessing said about a set of images: the refused ones with their reasons, and
    the used ones it flagged (`CropInfo.notes`: whole image kept, colour greyed, ...)."""

    refused: dict[str, str] = field(default_factory=dict)  # path -> one-line reason
    notes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # path -> notes (flagged images only)

    def counts(self) -> dict[str, int]:
        """Images per note, in the words of `NOTES`."""
        counts = Counter(NOTES[n] for notes in self.notes.values() for n in notes)
        return dict(sorted(counts.items()))


def screen(records: list[ImageRecord], source: ImageSource, progress: bool = True) -> Screening:
    """Preprocess every image once (filling the cache); the refused ones with their reasons and
    the flagged ones with their notes."""
    out = Screening()
    for rec in tqdm(records, desc="preprocess", unit="img", disable=not progress, leave=False):
        try:
            source.ensure(rec.path, rec.modality, rec.side)
        except InputImageError as exc:
            out.refused[rec.path] = str(exc)
    out.notes = noted([r for r in records if r.path not in out.refused], source)
    return out


def noted(records: list[ImageRecord], source: ImageSource) -> dict[str, tuple[str, ...]]:
    """The preprocessing notes of images already in the cache (path -> notes; flagged ones only)."""
    out = {}
    for rec in records:
        notes = source.notes(rec.path, rec.modality, rec.side)
        if notes:
            out[rec.path] = notes
    return out


def without_failed(instances: list[Instance], failed: dict[str, str], skipped: Counter) -> list[Instance]:
    """Drop instances whose US image was refused; mask refused MG views (drop if none is left)."""
    if not failed:
        return instances
    out = []
    for inst in instances:
        if inst.us is not None and inst.us.path in failed:
            skipped["instance: US image refused by preprocessing"] += 1
            continue
        kept = dataclasses.replace(inst, mg=tuple(None if r is not None and r.path in failed else r
                                                  for r in inst.mg))
        if inst.mg and not kept.own_mg:
            skipped["instance: every MG image refused by preprocessing"] += 1
            continue
        out.append(kept)
    return out
