"""Runtimes: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8, and the service's latency.

Usage: python bench/runtimes.py [--patients 100] [--repeats 3] [--clients 4] [--requests 40]
                                [--service-runtimes torch onnx]

The bundle of bench/predict.py (3-fold concat MM, frozen EfficientNet-Lite0 at 128 px,
trained on a synthetic cohort) is copied and given its ONNX graphs (`export_onnx`) and int8
backbones (`export_int8`, calibrated on training images of its own folds, AUC change measured
on its validation folds). Then:

- Runtimes. The same `--patients` generated patients (1-2 US images each, 4 MG views),
  preprocessed into a cache first, are predicted by `breastfusion.predict.run.predict` (no
  heatmaps: Grad-CAM runs on PyTorch only) with each runtime, each run in a fresh process
  (this script with --worker) so that its peak RSS is its own: bundle load (and ONNX Runtime
  sessions) timed apart from prediction. Runs are interleaved, the order rotating per repeat;
  patients/s is the best prediction time's, the ratios against PyTorch are medians of
  per-repeat ratios. Every runtime's probabilities are compared with PyTorch's.
- Service. `breastfusion serve` (a subprocess on 127.0.0.1, --no-heatmaps) answers `--clients`
  concurrent clients that post `--requests` single-patient studies in all (zips of images in
  the folder layout `ingest` reads), bounded by `--deadline` seconds; latency is the client's
  wall time from sending a request to its whole answer.

Targets (issue 17): ONNX Runtime fp32 >= 1.2x PyTorch eager patients/s, int8 >= 2x.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
from common import ROOT, WORK, quiet_logs, record, synthetic_cohort, verdict
from predict import trained_bundle

from breastfusion.choices import RUNTIMES

TARGETS = {"onnx": 1.2, "onnx-int8": 2.0}
PROBA = ["p_normal", "p_benign", "p_malignant"]


def onnx_bundle(size: int) -> Path:
    """The bench bundle with fp32 and int8 graphs (made once under WORK)."""
    from breastfusion.predict.int8 import export_int8
    from breastfusion.predict.onnx import export_onnx

    out = WORK / f"runtimes_bundle_{size}px"
    if not (out / "bundle.json").is_file() or not json.loads((out / "bundle.json").read_text()).get("onnx", {}).get(
            "int8"):
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(trained_bundle(size).root, out)
        export_onnx(out)
        train = synthetic_cohort(60, image_size=size, us_per_patient=(1, 3), seed=1)  # as predict.trained_bundle
        export_int8(out, WORK / f"predict_run_{size}px" / "rows" / "concat_MM", train,
                    cache_dir=WORK / "cache")
    return out


def worker(args) -> None:
    """One runtime, one process: load, predict, report seconds and peak RSS as one JSON line."""
    from breastfusion.predict.bundle import load_bundle
    from breastfusion.predict.run import predict, runtime_ready
    from breastfusion.records import read_manifest

    manifest = read_manifest(args.manifest)
    encoding = _time_encoding()
    with quiet_logs():
        start = time.perf_counter()
        bundle = load_bundle(args.bundle, networks=args.worker == "torch")
        runtime_ready(bundle, args.worker, False)
        loaded = time.perf_counter()
        pred = predict(manifest, bundle, cache_dir=args.cache, heatmaps=False, progress=False, runtime=args.worker)
        done = time.perf_counter()
    patients = pred.patients.sort_values("case_id")
    np.save(args.probabilities, patients[PROBA].to_numpy())
    print(json.dumps({"runtime": args.worker, "load_s": loaded - start, "predict_s": done - loaded,
                      "encode_s": encoding[0], "patients": len(patients), "decisions": list(patients["decision"]),
                      "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident size since its exec (VmHWM; getrusage's ru_maxrss would
    carry the peak of the parent that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _time_encoding() -> list[float]:
    """Seconds spent in the feature banks' `encode` (reading cached images + backbone), summed:
    what a faster backbone runtime can speed up; the rest of predict is the same code for all."""
    from breastfusion.predict import onnx, run

    spent = [0.0]
    for cls in (run.FeatureBank, onnx.OnnxFeatureBank):
        def timed(self, *a, _encode=cls.encode, **k):
            start = time.perf_counter()
            try:
                return _encode(self, *a, **k)
            finally:
                spent[0] += time.perf_counter() - start
        cls.encode = timed
    return spent


def run_worker(runtime: str, bundle: Path, manifest: str, cache: Path, probabilities: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", runtime, "--bundle", str(bundle), "--manifest",
                           manifest, "--cache", str(cache), "--probabilities", str(probabilities)],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{runtime} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def study_zips(manifest, n: int) -> list[bytes]:
    """The first `n` patients' images as zips in ingest's folder layout (PID/SIDE/MODALITY/file)."""
    zips = []
    for case in list(manifest.cases().values())[:n]:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
            for rec in case.mg.values():
                kind = "_cview" if rec.kind.value == "synthesized" else ""
                zf.write(rec.path, f"{case.patient_id}/{case.side.value}/MG/{rec.view.value}{kind}.png")
            for k, rec in enumerate(case.us):
                zf.write(rec.path, f"{case.patient_id}/{case.side.value}/US/us{k}.png")
        zips.append(buffer.getvalue())
    return zips


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_latency(bundle: Path, runtime: str, zips: list[bytes], clients: int, deadline: float) -> dict:
    """`clients` threads post the studies (taken in turn from one list) to a fresh server."""
    import httpx

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "breastfusion", "serve", "--model", str(bundle), "--port",
                               str(port), "--no-heatmaps", "--runtime", runtime, "--max-queue", str(clients),
                               "--quiet"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() - started > 120:
                raise SystemExit(f"the server did not start:\n{server.stderr.read()[-3000:]}")
            time.sleep(0.2)
        load_s = time.monotonic() - started
        todo, lock, results = list(enumerate(zips)), threading.Lock(), []
        stop_at = time.monotonic() + deadline

        def client():
            with httpx.Client(timeout=max(10.0, deadline)) as http:
                while time.monotonic() < stop_at:
                    with lock:
                        if not todo:
                            return
                        _, body = todo.pop(0)
                    sent = time.perf_counter()
                    response = http.post(f"{url}/predict?reports=0", content=body,
                                         headers={"Content-Type": "application/zip"})
                    results.append((response.status_code, time.perf_counter() - sent))

        threads = [threading.Thread(target=client) for _ in range(clients)]
        wall = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - wall
    finally:
        server.terminate()
        server.wait(30)
    ok = sorted(s for code, s in results if code == 200)
    return {"runtime": runtime, "requests": len(results), "answered_200": len(ok),
            "statuses": sorted({code for code, _ in results}), "server_start_s": load_s, "wall_s": wall,
            "p50_s": float(np.percentile(ok, 50)) if ok else None,
            "p95_s": float(np.percentile(ok, 95)) if ok else None,
            "studies_per_s": len(ok) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds the clients may take in all")
    parser.add_argument("--service-runtimes", nargs="*", default=["torch", "onnx"], choices=RUNTIMES)
    parser.add_argument("--worker", choices=RUNTIMES, help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--probabilities", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    bundle = onnx_bundle(args.size)
    int8_info = json.loads((bundle / "bundle.json").read_text())["onnx"]["int8"]
    manifest = synthetic_cohort(args.patients, image_size=args.size, us_per_patient=(1, 2), seed=11)
    work = WORK / "runtimes"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cache = work / "cache"
    run_worker("torch", bundle, manifest.source, cache, work / "warm.npy")  # fills the preprocessing cache
    runs = {r: [] for r in RUNTIMES}
    for rep in range(args.repeats):
        order = RUNTIMES[rep % len(RUNTIMES):] + RUNTIMES[:rep % len(RUNTIMES)]
        for runtime in order:
            result = run_worker(runtime, bundle, manifest.source, cache, work / f"{runtime}.{rep}.npy")
            result["repeat"] = rep
            runs[runtime].append(result)
            print({k: v for k, v in result.items() if k != "decisions"}, flush=True)
    reference = np.load(work / "torch.0.npy")
    rows = []
    for runtime in RUNTIMES:
        best = min(r["predict_s"] for r in runs[runtime])
        ratio = statistics.median(runs["torch"][k]["predict_s"] / runs[runtime][k]["predict_s"]
                                  for k in range(args.repeats))
        probs = np.load(work / f"{runtime}.0.npy")
        rows.append({"runtime": runtime, "patients": runs[runtime][0]["patients"], "best_predict_s": best,
                     "patients_per_s": runs[runtime][0]["patients"] / best, "ratio_vs_torch": ratio,
                     "load_s": min(r["load_s"] for r in runs[runtime]),
                     "encode_s": min(r["encode_s"] for r in runs[runtime]),
                     "encode_ratio_vs_torch": statistics.median(
                         runs["torch"][k]["encode_s"] / runs[runtime][k]["encode_s"] for k in range(args.repeats)),
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[runtime]),
                     "max_probability_change": float(np.abs(probs - reference).max()),
                     "decisions_changed": sum(a != b for a, b in zip(runs[runtime][0]["decisions"],
                                                                     runs["torch"][0]["decisions"], strict=True))})
    zips = study_zips(manifest, args.requests)
    service = [service_latency(bundle, r, zips, args.clients, args.deadline) for r in args.service_runtimes]
    for s in service:
        print(s, flush=True)

    by = {r["runtime"]: r for r in rows}
    lines = [
        f"### Runtimes ({args.size} px, 3-fold concat MM bundle, frozen EfficientNet-Lite0, no heatmaps, "
        f"preprocessing cached, one process per run)",
        "",
        f"{args.patients} generated patients ({sum(1 for _ in manifest.records)} images), {args.repeats} interleaved "
        "repeats; patients/s from the best prediction time, ratio = median of per-repeat ratios to PyTorch.",
        "",
        "| runtime | patients/s | vs PyTorch | predict s | of which encoding s | encoding vs PyTorch | load s | "
        "peak RSS MiB | max prob. change | decisions changed |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(f"| {r['runtime']} | {r['patients_per_s']:.1f} | {r['ratio_vs_torch']:.2f}x | {r['best_predict_s']:.2f} | "
          f"{r['encode_s']:.2f} | {r['encode_ratio_vs_torch']:.2f}x | {r['load_s']:.1f} | "
          f"{r['peak_rss_mb']:.0f} | {r['max_probability_change']:.1e} | {r['decisions_changed']} |" for r in rows),
        "",
        "Encoding = the feature banks' `encode` (cached images read + backbone); the rest of predict "
        "(heads, calibration, aggregation, decisions) is the same code for every runtime.",
        "",
        "Targets: ONNX Runtime fp32 >= 1.2x PyTorch: "
        f"{by['onnx']['ratio_vs_torch']:.2f}x, {verdict(by['onnx']['ratio_vs_torch'], TARGETS['onnx'])}; "
        f"int8 >= 2x: {by['onnx-int8']['ratio_vs_torch']:.2f}x, "
        f"{verdict(by['onnx-int8']['ratio_vs_torch'], TARGETS['onnx-int8'])}.",
        "",
        "int8 on this bundle's validation folds (export_int8's measure, synthetic training cohort): "
        + _auc_line(int8_info.get("auc_change") or {}),
        "",
        f"Service (`breastfusion serve --no-heatmaps`, loopback, {args.clients} concurrent clients, one "
        "single-patient zip per request, queue limit = clients):",
        "",
        "| runtime | requests | answered 200 | p50 s | p95 s | studies/s | server start s |",
        "|---|---|---|---|---|---|---|",
        *(f"| {s['runtime']} | {s['requests']} | {s['answered_200']} | {s['p50_s'] or float('nan'):.2f} | "
          f"{s['p95_s'] or float('nan'):.2f} | {s['studies_per_s']:.2f} | {s['server_start_s']:.1f} |"
          for s in service),
    ]
    record("runtimes", {"rows": rows, "runs": runs, "service": service, "int8": int8_info}, "\n".join(lines))


def _auc_line(change: dict) -> str:
    if not change:
        return "not measured."
    delta = ", ".join(f"{c} {100 * d:+.1f}" for c, d in change["auc_change"].items())
    return (f"{change['patients']} patients, AUC change in points (int8 - fp32): {delta}; largest probability "
            f"change {change['largest_probability_change']:.3f}, triage changed for {change['triage_changed']}, "
            f"decision for {change['decision_changed']}.")


if __name__ == "__main__":
    main()
