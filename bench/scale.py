"""Scale: cross-validation wall time and peak memory at 1x, 2x and 4x patients.

Usage: python bench/scale.py [--base 50] [--size 128] [--folds 5] [--epochs 20]

Each size runs `--repeats` times (interleaved with the other sizes; the best
time and the highest peak memory are reported), each run in a fresh child
process (so its peak RSS is its own) on a
synthetic cohort generated beforehand (generation not timed), from an EMPTY
cache: preprocessing, frozen EfficientNet-Lite0 features (1 augmented copy)
and the full k-fold CV of the concat MM row (branches first, then fusion),
reports included. Time should grow about linearly with patients, peak memory
should stay flat: images and features are streamed from the on-disk caches.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys

from common import WORK, record, synthetic_cohort, verdict

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from breastfusion.allocator import reuse_freed_memory
reuse_freed_memory()  # as the command line does
from breastfusion.experiment import run_experiment
from breastfusion.presets import cpu_reference, demo_rows
from breastfusion.records import read_manifest
manifest_path, out = sys.argv[1], Path(sys.argv[2])
size, folds, epochs = (int(a) for a in sys.argv[3:6])
start = time.perf_counter()
manifest = read_manifest(manifest_path)
(row,) = [r for r in demo_rows(cpu_reference(image_size=size, epochs=epochs, copies=1)) if r.name == "concat MM"]
row.cv.folds, row.cv.test_folds = folds, 1
row.train.cache_dir = str(out / "cache")
run_experiment(manifest, [row], out / "run", progress=False)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "images": len(manifest.records)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=int, default=100, help="patients at 1x")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2, help="runs per size (best time, highest memory)")
    args = ap.parse_args()
    figures = {}
    runs: dict[int, list[dict]] = {1: [], 2: [], 4: []}
    for rep in range(args.repeats):  # sizes interleaved: a drift in the machine's speed hits all alike
        for factor in (1, 2, 4):
            n = args.base * factor
            synthetic_cohort(n, image_size=args.size, us_per_patient=(1, 4), seed=11)
            manifest = WORK / f"synth_{n}p_{args.size}px_us1-4_s11" / "manifest.csv"
            out = WORK / f"scale_{n}p"
            shutil.rmtree(out, ignore_errors=True)  # an empty cache every time
            done = subprocess.run([sys.executable, "-c", CHILD, str(manifest), str(out), str(args.size),
                                   str(args.folds), str(args.epochs)], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"the {factor}x run failed:\n{done.stderr[-3000:]}")
            runs[factor].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rep, factor, runs[factor][-1], flush=True)
    for factor, results in runs.items():
        figures[f"{factor}x"] = {"patients": args.base * factor, "images": results[0]["images"],
                                 "seconds": min(r["seconds"] for r in results),
                                 "peak_rss_mb": max(r["peak_rss_mb"] for r in results), "runs": results}
    base = figures["1x"]
    lines = ["| patients | images | CV wall s | time vs 1x | peak RSS MiB | RSS vs 1x |", "|---|---|---|---|---|---|"]
    for f in figures.values():
        lines.append(f"| {f['patients']} | {f['images']} | {f['seconds']:.0f} | "
                     f"{f['seconds'] / base['seconds']:.2f}x | "
                     f"{f['peak_rss_mb']:.0f} | {f['peak_rss_mb'] / base['peak_rss_mb'] - 1:+.1%} |")
    four = figures["4x"]
    t, m = four["seconds"] / base["seconds"], four["peak_rss_mb"] / base["peak_rss_mb"] - 1
    lines += ["", f"Targets: 4x patients <= 4.4x time: {t:.2f}x, {verdict(t, 4.4, False)}; peak RSS growth < 20%: "
              f"{m:+.1%}, {verdict(m, 0.2, False)}."]
    record("scale", figures, f"### Scale ({args.size} px, concat MM cached mode, {args.folds}-fold CV, "
           f"{args.epochs} epochs, empty cache each run, best of {args.repeats})\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
