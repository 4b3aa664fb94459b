"""Probe (issue 13): would test-time augmentation lift a trained MG branch?

Partial mode caches, for every image, the plain image's activations and `train.feature_copies`
augmented copies (the paper's flip and rotation). A search run's fold networks were trained and
their epoch chosen on the plain test-split images; this probe predicts each fold's **test
split** (never the validation fold) once per copy and scores the breasts on the mean of the
copies' probabilities, against the plain image alone. (The epoch was chosen on the plain
predictions, which favours them, not the average.) Inference would then have to compute the
copies too: k + 1 backbone passes per image.

    python bench/tta_probe.py --data cdd-cesm --run mg-lite2-512-att4-bilateral-10splits \\
        --set model.backbone.name=efficientnet_lite2 --set model.backbone.image_size=512 \\
        --set model.backbone.pooling=attention --set model.backbone.attention_cell=4 \\
        --set model.bilateral=true
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, patient_macro_auc  # noqa: E402
from probe import branch_data, probe_arguments, record_probe  # noqa: E402

from breastfusion.evaluation.aggregate import PROBA_COLUMNS  # noqa: E402
from breastfusion.inference.layout import MODEL_FILE  # noqa: E402
from breastfusion.inference.networks import trained_net  # noqa: E402
from breastfusion.models.weights import read_state_dict  # noqa: E402
from breastfusion.training.data import FeatureInstances  # noqa: E402
from breastfusion.training.fold import prediction_rows  # noqa: E402
from breastfusion.training.loop import predict_logits  # noqa: E402


class OneCopy(FeatureInstances):
    """Evaluation items made of every image's stored copy `copy` (0: the plain image)."""

    def __init__(self, instances, features, copy: int):
        super().__init__(instances, features, train=False, kind="act")
        self.copy = copy

    def _feat(self, path, rng):
        if path is None:
            return torch.zeros(self.mg_shape)
        return torch.from_numpy(np.array(self.features[path][self.copy], dtype=np.float32))


def main() -> None:
    args = probe_arguments(__doc__, extra=lambda ap: ap.add_argument(
        "--run", required=True, help="a search run's label (runs/search/DATA/LABEL)"))
    cfg, data = branch_data(args.data, args.sets, bilateral=False)
    run_dir = ROOT / "runs" / "search" / args.data / args.run
    copies = 1 + cfg.train.feature_copies
    folds = []
    for split in data.splits[: args.folds]:
        test_cases = set(split.test)
        items = [i for i in data.instances if i.case_id in test_cases]
        net = trained_net(cfg, read_state_dict(run_dir / f"fold_{split.fold}" / MODEL_FILE), True)
        probs = []
        for k in range(copies):
            loader = DataLoader(OneCopy(items, data.features, k), batch_size=64)
            logits, index = predict_logits(net, loader, torch.device("cpu"))
            probs.append(prediction_rows(logits, index, items, split.fold).sort_values("instance_id"))
        mean = probs[0].copy()
        mean[PROBA_COLUMNS] = np.mean([p[PROBA_COLUMNS].to_numpy() for p in probs], axis=0)
        fold = {"fold": split.fold, "plain": patient_macro_auc(probs[0]), f"mean of {copies}": patient_macro_auc(mean)}
        print(json.dumps(fold), flush=True)
        folds.append(fold)
    record_probe("tta_probe", folds, data=args.data, run=args.run)


if __name__ == "__main__":
    main()
