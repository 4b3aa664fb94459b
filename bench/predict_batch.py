"""Long prediction batches: peak memory and patients/s of `breastfusion predict` at two batch sizes.

Usage: python bench/predict_batch.py [--patients 200 2000] [--size 128] [--heatmaps]

The bundle of bench/predict.py (3-fold concat MM, frozen EfficientNet-Lite0, trained on a
synthetic cohort) predicts synthetic cohorts of each size (1-2 US images per patient) through
the command line, each run in its own process with an empty preprocessing cache (end to end:
reading, preprocessing, backbone, heads, calibration, decisions, reports, worklist), timed and
measured by /usr/bin/time (wall seconds, peak resident set size). `predict` streams
(predict/run.py, `predict_batch`): 32 patients at a time, so its peak memory should not grow
with the batch. Target: peak RSS of the largest batch within 20% of the smallest.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, WORK, record, synthetic_cohort, verdict
from predict import trained_bundle

TARGET_RSS_RATIO = 1.2


def run(manifest: Path, bundle: Path, heatmaps: bool) -> dict:
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        stats = Path(tmp) / "time.txt"
        cmd = ["/usr/bin/time", "-f", "%e %M", "-o", str(stats), sys.executable, "-m", "breastfusion", "predict",
               str(manifest), "--model", str(bundle), "-o", str(Path(tmp) / "out"), "--cache-dir",
               str(Path(tmp) / "cache"), "-q"]
        if not heatmaps:
            cmd.append("--no-heatmaps")
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        if done.returncode not in (0, 4):
            raise SystemExit(f"predict failed ({done.returncode}):\n{done.stderr[-2000:]}")
        seconds, kib = stats.read_text().split()[-2:]
        patients = sum(1 for _ in open(Path(tmp) / "out" / "predictions.csv")) - 1
        reports = len(list((Path(tmp) / "out" / "reports").glob("*.html")))
    return {"patients": patients, "reports": reports, "seconds": float(seconds), "peak_rss_mb": int(kib) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--heatmaps", action="store_true", help="Grad-CAM heatmaps too (much slower)")
    args = parser.parse_args()
    bundle = trained_bundle(args.size).root
    rows = []
    for n in args.patients:
        manifest = Path(synthetic_cohort(n, image_size=args.size, us_per_patient=(1, 2), seed=7).source)
        result = run(manifest, bundle, args.heatmaps)
        result["patients_per_s"] = result["patients"] / result["seconds"]
        rows.append(result)
        print(result, flush=True)
    ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
    lines = [
        f"### Long prediction batches ({args.size} px, 3-fold concat MM bundle, frozen EfficientNet-Lite0, "
        f"{'with' if args.heatmaps else 'no'} heatmaps, empty preprocessing cache, one process per batch)",
        "",
        "| patients | reports written | wall s | patients/s | peak RSS MiB |",
        "|---|---|---|---|---|",
        *(f"| {r['patients']} | {r['reports']} | {r['seconds']:.0f} | {r['patients_per_s']:.1f} | "
          f"{r['peak_rss_mb']:.0f} |" for r in rows),
        "",
        f"Peak RSS at {rows[-1]['patients']} patients / at {rows[0]['patients']}: {ratio:.2f} "
        f"(target <= {TARGET_RSS_RATIO}: {verdict(ratio, TARGET_RSS_RATIO, higher_is_better=False)}).",
    ]
    name = "predict_batch" + ("_heatmaps" if args.heatmaps else "")
    record(name, {"rows": rows, "rss_ratio": ratio, "heatmaps": args.heatmaps, "size": args.size},
           "\n".join(lines))


if __name__ == "__main__":
    main()
