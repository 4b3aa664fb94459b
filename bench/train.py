"""Training: a fine-tune epoch vs the bare backbone forward+backward, the data loader's own
rate, and the cached-feature mode's epoch time.

Usage: python bench/train.py [--patients 40] [--size 128] [--batch 16] [--workers 0]

Model: the concat MM network (EfficientNet-Lite0, ImageNet weights, stem and
layer1 frozen as the paper's "first two layers"), trained end to end on a
synthetic cohort, on CPU in float32 (channels_last as configured).

- loader: one epoch of the training DataLoader alone (read from the
  preprocessing cache, flip + rotation augmentation, collation);
- fine-tune: `training.loop.fit` for `--epochs` epochs (forward, weighted CE +
  ArcFace loss, backward, SGD step, and the per-epoch test-split evaluation
  on a one-patient test split), instances/s;
- bare backbone: the same model's two backbones, forward and backward on
  batches of exactly the training batches' shapes (B*4 MG views, B US images),
  already in memory, same frozen stages and memory layout (channels_last), no
  head, loss = mean of the features, no optimizer step: the limit the training
  loop is compared with;
- cached mode: the same cohort and head on cached frozen features, seconds per
  epoch (train + test evaluation), features precomputed.
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import WORK, Clock, quiet_logs, record, synthetic_cohort, verdict

from breastfusion.inference.runtime import memory_format, pick_device, to_device
from breastfusion.presets import cpu_reference, demo_rows
from breastfusion.training.fold import _Trainer
from breastfusion.training.loop import fit
from breastfusion.training.preparation import prepare


def config(size: int, batch: int, workers: int, mode: str):
    (row,) = [r for r in demo_rows(cpu_reference(image_size=size, epochs=1, copies=1)) if r.name == "concat MM"]
    row.train.mode, row.train.batch_size, row.train.num_workers = mode, batch, workers
    row.train.cache_dir = str(WORK / "cache")
    row.train.checkpoint_seconds = 1e9
    row.cv.folds, row.cv.test_folds = 3, 1  # folds only shape the split; every instance trains here
    if mode == "finetune":
        row.model.backbone.frozen = "layer1"
    return row


def split(data):
    """Every instance trains; one patient's instances make the (tiny) test split."""
    first = data.instances[0].case_id
    return data.instances, [i for i in data.instances if i.case_id == first]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    manifest = synthetic_cohort(args.patients, image_size=args.size, us_per_patient=(1, 3), seed=7)
    device = pick_device("cpu")
    cfg = config(args.size, args.batch, args.workers, "finetune")
    cfg.train.epochs = args.epochs
    with quiet_logs():
        data = prepare(manifest, cfg, progress=False)
    train, test = split(data)
    trainer = _Trainer(cfg, data, seed=0, device=device, progress=False)

    loader = trainer.loader(train, True)
    with Clock() as load:
        shapes = [(len(b["label"]), b["mg"].shape, b["us"].shape) for b in loader]
    model = trainer.build(cfg.model).to(device)
    warm_cfg = copy.deepcopy(cfg.train)
    warm_cfg.epochs = 1
    fit(copy.deepcopy(model), loader, trainer.loader(test, False), warm_cfg, cfg.model.arcface_loss_weight,
        device, progress=False)  # warm-up, not timed (as the bare backbone's first pass)
    with Clock() as tune:
        fit(model, loader, trainer.loader(test, False), cfg.train, cfg.model.arcface_loss_weight, device,
            progress=False)
    n_train = len(train) * args.epochs

    bare = copy.deepcopy(model).train()
    bare_s = 0.0
    with memory_format(bare, cfg.train.channels_last) as cl:  # the layout fit trains in
        batches = [to_device({"mg": torch.rand(mg[0] * mg[1], *mg[2:]), "us": torch.rand(us)}, device, cl)
                   for _, mg, us in shapes]
        for epoch in range(args.epochs + 1):  # the first pass warms up, like fit's first epoch
            with Clock() as clock:
                for b in batches:
                    loss = bare.mg_backbone(b["mg"]).mean() + bare.us_backbone(b["us"]).mean()
                    loss.backward()
                    bare.zero_grad(set_to_none=True)
            bare_s += clock.seconds if epoch else 0.0

    cached = config(args.size, args.batch, args.workers, "cached")
    cached.train.epochs = 20
    with quiet_logs():
        cdata = prepare(manifest, cached, progress=False)
    ctrain, ctest = split(cdata)
    ctrainer = _Trainer(cached, cdata, seed=0, device=device, progress=False)
    head = ctrainer.build(cached.model).to(device)
    with Clock() as cached_clock:
        fit(head, ctrainer.loader(ctrain, True), ctrainer.loader(ctest, False), cached.train,
            cached.model.arcface_loss_weight, device, progress=False)

    figures = {
        "instances": len(train), "epochs": args.epochs, "batch_size": args.batch, "num_workers": args.workers,
        "images_per_instance": 5,
        "loader_instances_per_s": len(train) / load.seconds,
        "finetune_instances_per_s": n_train / tune.seconds,
        "bare_backbone_instances_per_s": n_train / bare_s,
        "ratio_finetune_to_bare": bare_s / tune.seconds,
        "cached_epoch_s": cached_clock.seconds / cached.train.epochs,
        "cached_feature_copies": cached.train.feature_copies,
    }
    line = (f"### Training ({args.size} px, concat MM, EfficientNet-Lite0 stem+layer1 frozen, batch {args.batch}, "
            f"{args.workers} loader workers, CPU fp32)\n\n"
            "| instances | loader inst/s | fine-tune inst/s | bare backbone fwd+bwd inst/s | fine-tune / bare "
            "| cached-mode epoch s |\n|---|---|---|---|---|---|\n"
            f"| {len(train)} | {figures['loader_instances_per_s']:.1f} | {figures['finetune_instances_per_s']:.2f} | "
            f"{figures['bare_backbone_instances_per_s']:.2f} | {figures['ratio_finetune_to_bare']:.0%} | "
            f"{figures['cached_epoch_s']:.3f} |\n\nTarget: fine-tune >= 85% of the bare backbone: "
            f"{figures['ratio_finetune_to_bare']:.0%}, {verdict(figures['ratio_finetune_to_bare'], 0.85)}.")
    record("train", figures, line)


if __name__ == "__main__":
    main()
