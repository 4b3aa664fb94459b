"""Allocator: the same backbone work with glibc's default malloc thresholds and with the
raised ones the command line sets (breastfusion/allocator.py), each in a fresh process.

Usage: python bench/allocator.py [--size 128] [--images 704] [--processes 2]

Work: EfficientNet-Lite0 (ImageNet weights, channels-last, fp32) on random images, either
inference (forward passes in batches of 32, as predict) or fine-tuning (forward, backward
and an SGD step in batches of 16, stem frozen, as the training loop). Each process times
its work 3 times after a warm-up batch and keeps the best; `--processes` processes per
setting run alternately and the best is reported, with the minor page faults and the
kernel (system) time of that best repetition.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common import record

CHILD = r"""
import json, resource, sys, time, torch
from breastfusion.allocator import reuse_freed_memory
applied = reuse_freed_memory()  # leaves glibc's defaults when BREASTFUSION_MALLOC=default
from breastfusion.config import BackboneConfig
from breastfusion.models.backbones import build_backbone
from breastfusion.inference.runtime import memory_format
mode, size, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
bb = build_backbone(BackboneConfig(name="efficientnet_lite0", weights="imagenet", image_size=size,
                                   frozen="stem" if mode == "train" else "all"))
x = torch.rand(n, 1, size, size).contiguous(memory_format=torch.channels_last)
batch = 32 if mode == "forward" else 16
head = torch.nn.Linear(bb.out_dim, 3)
opt = torch.optim.SGD([p for p in [*bb.parameters(), *head.parameters()] if p.requires_grad], lr=1e-3)
labels = torch.randint(0, 3, (n,))

def step(s):
    if mode == "forward":
        with torch.no_grad():
            bb(x[s:s + batch])
        return
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(head(bb(x[s:s + batch])), labels[s:s + batch])
    loss.backward()
    opt.step()

best = None
with memory_format(bb, True):
    bb.train(mode == "train")
    step(0)  # warm-up
    for _ in range(3):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for s in range(0, n, batch):
            step(s)
        seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        run = {"seconds": seconds, "faults": r1.ru_minflt - r0.ru_minflt, "system_s": r1.ru_stime - r0.ru_stime}
        if best is None or seconds < best["seconds"]:
            best = run
print(json.dumps({"applied": applied, **best}))
"""


def child(mode: str, setting: str, size: int, images: int) -> dict:
    env = {**os.environ, "BREASTFUSION_MALLOC": "default" if setting == "default" else "reuse"}
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(size), str(images)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--images", type=int, default=704)
    ap.add_argument("--processes", type=int, default=2)
    args = ap.parse_args()
    figures = {}
    lines = ["| work | malloc thresholds | images | img/s | minor page faults / image | kernel CPU s / wall s "
             "| speed-up |",
             "|---|---|---|---|---|---|---|"]
    for mode, images in (("forward", args.images), ("train", args.images // 2)):
        runs = {"default": [], "raised": []}
        for _ in range(args.processes):  # alternating, so a drift of the machine hits both
            for setting in runs:
                runs[setting].append(child(mode, setting, args.size, images))
        best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
        assert best["raised"]["applied"] and not best["default"]["applied"]
        figures[mode] = {"images": images, "runs": runs, "best": best,
                         "speedup": best["default"]["seconds"] / best["raised"]["seconds"]}
        for setting in ("default", "raised"):
            b = best[setting]
            speed = f"{figures[mode]['speedup']:.2f}x" if setting == "raised" else "1.00x"
            lines.append(f"| {mode} | {setting} | {images} | {images / b['seconds']:.1f} | "
                         f"{b['faults'] / images:.0f} | {b['system_s'] / b['seconds']:.0%} | {speed} |")
    record("allocator", figures, f"### CPU allocator: glibc's default malloc thresholds vs raised "
           f"({args.size} px, EfficientNet-Lite0, fp32, channels-last)\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
