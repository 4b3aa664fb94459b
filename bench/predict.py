"""Prediction: end-to-end throughput vs the raw backbone, and MG-once vs naive pairing.

Usage: python bench/predict.py [--patients 40] [--size 128] [--us 1 3 5]

A bundle is trained once (synthetic cohort, the demo's concat MM model in
cached-feature mode, 3 folds, frozen EfficientNet-Lite0 shared by the folds)
and exported under WORK. For each number k of US images per patient, a new
synthetic cohort of `--patients` patients with exactly k US images each is
preprocessed into the cache, then timed:

- predict: `breastfusion.predict.run.predict` without heatmaps (read from the
  preprocessing cache, MG-once backbone features, every fold's head,
  calibration, patient aggregation, decisions);
- raw backbone: the same distinct images, already in memory as one tensor,
  through the same backbone module(s) in batches of the same size; nothing else;
- naive pairing: instances (each its MG views + one US image) batched 32 at a
  time through the whole network, as cross-validation predicts: a patient's MG
  views go through the backbone once per US image. Heads and calibration as in
  predict (folds sharing a frozen backbone share its features here too).

Every path uses the bundle's memory layout (channels_last) and precision.

Ratio = raw backbone time / predict time (the share of predict that is backbone
work); MG-once speed-up = naive time / predict time. Both paths' probabilities
are checked equal.
"""

from __future__ import annotations

import argparse
import contextlib

import numpy as np
import torch
from common import WORK, Clock, quiet_logs, record, synthetic_cohort, verdict

from breastfusion.experiment import run_experiment
from breastfusion.predict.bundle import export_bundle, load_bundle
from breastfusion.predict.run import predict
from breastfusion.presets import cpu_reference, demo_rows
from breastfusion.training.cv import image_source, screen
from breastfusion.training.data import ImageInstances
from breastfusion.training.device import memory_format, to_device
from breastfusion.training.instances import build_instances
from breastfusion.vocab import Modality

BATCH = 32  # images per backbone call, as FeatureBank


def trained_bundle(size: int):
    out = WORK / f"predict_bundle_{size}px"
    if not (out / "bundle.json").is_file():
        manifest = synthetic_cohort(60, image_size=size, us_per_patient=(1, 3), seed=1)
        (row,) = [r for r in demo_rows(cpu_reference(image_size=size, epochs=10, copies=0)) if r.name == "concat MM"]
        row.cv.folds, row.cv.test_folds = 3, 1
        row.train.cache_dir = str(WORK / "cache")
        run_experiment(manifest, [row], WORK / f"predict_run_{size}px", progress=False)
        export_bundle(WORK / f"predict_run_{size}px" / "rows" / "concat_MM", out)
    return load_bundle(out)


def raw_backbone_seconds(bundle, items, source) -> tuple[float, int]:
    """Distinct (backbone, image) pairs predict must encode, timed through the bare backbones."""
    work = {}
    for net in bundle.nets:
        for m in net.head.modalities:
            bb = net.backbone(m)
            recs = [r for i in items for r in (i.mg if m is Modality.MG else (i.us,)) if r is not None]
            work.setdefault(id(bb), (bb, {}))[1].update({r.path: r for r in recs})
    seconds, n = 0.0, 0
    layout = bundle.config.train.channels_last
    for bb, recs in work.values():
        images = torch.stack([torch.from_numpy(source.get(r.path, r.modality, r.side)) for r in recs.values()])
        bb.eval()
        with torch.no_grad(), memory_format(bb, layout) as cl:
            images = to_device({"x": images.unsqueeze(1)}, torch.device("cpu"), cl)["x"]
            with Clock() as clock:
                for start in range(0, len(images), BATCH):
                    bb(images[start:start + BATCH])
        seconds += clock.seconds
        n += len(images)
    return seconds, n


def naive_seconds(bundle, items, source) -> tuple[float, np.ndarray]:
    """Per-instance pairing: every instance's MG views and US image encoded together."""
    nets = bundle.nets
    loader = torch.utils.data.DataLoader(ImageInstances(items, source, train=False),
                                         batch_size=BATCH)  # instances per call, as the CV code predicts
    layouts = contextlib.ExitStack()
    for net in nets:
        layouts.enter_context(memory_format(net, bundle.config.train.channels_last))
    with layouts, torch.no_grad(), Clock() as clock:
        logits = [[] for _ in nets]
        for batch in loader:
            cache = {}
            for k, net in enumerate(nets):
                inputs = {}
                if Modality.MG in net.head.modalities:
                    bb = net.backbone(Modality.MG)
                    if id(bb) not in cache:
                        cache[id(bb)] = net.encode_mg(batch["mg"], batch["mg_mask"])
                    inputs.update(mg_feat=cache[id(bb)], mg_mask=batch["mg_mask"])
                if Modality.US in net.head.modalities:
                    bb = net.backbone(Modality.US)
                    if id(bb) not in cache:
                        cache[id(bb)] = net.encode_us(batch["us"])
                    inputs["us_feat"] = cache[id(bb)]
                logits[k].append(net.head(**inputs).logits.float().numpy())
        probs = bundle.probabilities([np.concatenate(x) for x in logits])
    return clock.seconds, probs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--us", type=int, nargs="+", default=[1, 3, 5])
    args = ap.parse_args()
    with quiet_logs():
        bundle = trained_bundle(args.size)
    for net in bundle.nets:
        net.eval()
    source = image_source(bundle.config, WORK / "cache")
    figures = {}
    lines = ["| US images / patient | patients | images | predict patients/s | predict img/s | raw backbone img/s "
             "| predict / raw | naive s | MG-once s | MG-once speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k in args.us:
        manifest = synthetic_cohort(args.patients, image_size=args.size, us_per_patient=(k, k), seed=100 + k)
        items, _ = build_instances(manifest.cases().values(), bundle.config.model.modality_set,
                                   bundle.config.model.slots)
        screen([r for r in manifest.records], source, progress=False)  # warm the preprocessing cache
        predict(manifest, bundle, WORK / "cache", heatmaps=False, device="cpu", progress=False)  # warm-up
        with Clock() as clock:
            pred = predict(manifest, bundle, WORK / "cache", heatmaps=False, device="cpu", progress=False)
        raw_s, n_images = raw_backbone_seconds(bundle, items, source)
        naive_s, naive_p = naive_seconds(bundle, items, source)
        once_p = pred.instances[[c for c in pred.instances.columns if c.startswith("p_")]].to_numpy()
        assert np.allclose(naive_p, once_p, atol=1e-5), "naive and MG-once probabilities differ"
        row = {"us_per_patient": k, "patients": args.patients, "instances": len(items),
               "distinct_images_encoded": n_images, "predict_s": clock.seconds, "raw_backbone_s": raw_s,
               "naive_s": naive_s, "predict_patients_per_s": args.patients / clock.seconds,
               "predict_images_per_s": n_images / clock.seconds, "raw_images_per_s": n_images / raw_s,
               "ratio_predict_to_raw": raw_s / clock.seconds, "mg_once_speedup": naive_s / clock.seconds}
        figures[f"us{k}"] = row
        lines.append(f"| {k} | {args.patients} | {n_images} | {row['predict_patients_per_s']:.2f} | "
                     f"{row['predict_images_per_s']:.1f} | {row['raw_images_per_s']:.1f} | "
                     f"{row['ratio_predict_to_raw']:.0%} | {naive_s:.1f} | {clock.seconds:.1f} | "
                     f"{row['mg_once_speedup']:.2f}x |")
    worst = min(f["ratio_predict_to_raw"] for f in figures.values())
    lines.append("")
    lines.append(f"Targets: predict >= 90% of the raw backbone: lowest {worst:.0%}, {verdict(worst, 0.9)}.")
    if "us3" in figures:
        speed = figures["us3"]["mg_once_speedup"]
        lines[-1] += f" MG-once >= 2x naive at 3 US images per patient: {speed:.2f}x, {verdict(speed, 2.0)}."
    record("predict", figures, f"### Prediction ({args.size} px, 3-fold concat MM bundle, frozen EfficientNet-Lite0, "
           "no heatmaps, preprocessing cached)\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
