"""Preprocessing: images/s cold (read, crop, orient, resize, store) vs from the cache.

Usage: python bench/preprocess.py [--size 224] [--limit 300]

Runs on the synthetic cohort (generated) and, when present, on real BUSI
ultrasound and CDD-CESM mammograms from ../shared/datasets. "Cold" starts from
an empty cache; "cached" is a new cache object on the filled folder, as a new
process would see it (the source files are hashed again: the cache is keyed by
content, so a cached read still costs one SHA-256 of the source file).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from common import WORK, Clock, quiet_logs, record, synthetic_cohort, verdict

from breastfusion.errors import InputImageError
from breastfusion.preprocess.pipeline import PreprocessCache, Preprocessor

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def records_of(name: str, limit: int):
    if name == "synthetic":
        return synthetic_cohort(max(limit // 6, 10), image_size=256, us_per_patient=(2, 2)).records[:limit]
    from breastfusion.datasets.public import load_public

    root = DATASETS / {"busi": "BUSI", "cdd-cesm": "CDD-CESM"}[name]
    if not root.is_dir():
        return None
    recs = load_public(name, root)
    return recs[:limit]


def bench(recs, size: int, cache: Path) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    pre = Preprocessor(size=size)
    passes = {}
    for label in ("cold", "cached"):
        source = PreprocessCache(cache, pre)  # a new object: nothing memoised in memory
        refused = 0
        with Clock() as clock:
            for rec in recs:
                try:
                    source.get(rec.path, rec.modality, rec.side)
                except InputImageError:
                    refused += 1
        passes[label] = {"seconds": clock.seconds, "images_per_s": len(recs) / clock.seconds,
                         "computed": source.computed, "reused": source.reused, "refused": refused}
    passes["speedup"] = passes["cached"]["images_per_s"] / passes["cold"]["images_per_s"]
    return passes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--limit", type=int, default=300, help="images per dataset")
    args = ap.parse_args()
    figures, lines = {}, ["| data | images | cold img/s | cached img/s | speed-up |", "|---|---|---|---|---|"]
    for name in ("synthetic", "busi", "cdd-cesm"):
        with quiet_logs():
            recs = records_of(name, args.limit)
        if recs is None:
            lines.append(f"| {name} | not found under {DATASETS} | | | |")
            continue
        kinds = sorted({r.modality.value for r in recs})
        res = bench(recs, args.size, WORK / "preprocess_cache" / name)
        figures[name] = {"images": len(recs), "modalities": kinds, **res}
        lines.append(f"| {name} ({'+'.join(kinds)}) | {len(recs)} | {res['cold']['images_per_s']:.1f} | "
                     f"{res['cached']['images_per_s']:.1f} | {res['speedup']:.1f}x |")
    worst = min(f["speedup"] for f in figures.values())
    lines += ["", f"Target: cached >= 10x faster than cold: lowest {worst:.0f}x, {verdict(worst, 10)}."]
    record("preprocess", figures, f"### Preprocessing, cold vs cached ({args.size} px output)\n\n"
           + "\n".join(lines))


if __name__ == "__main__":
    main()
