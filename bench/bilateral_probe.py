"""Probe (issue 13): does the other breast of the same woman help single MG on CDD-CESM?

Subtracted contrast mammograms show background enhancement that differs from woman to woman
but is roughly symmetric; a lesion is not. This probe asks, before any model is built for it,
whether the contralateral breast's frozen features carry that signal: a multinomial logistic
regression on each breast's frozen backbone features (CC and MLO averaged, plain image) is
trained on a fold's training portion and scored on the fold's **test split** (never the
validation fold), once on the breast's own features and once with the difference to the other
breast appended. Features come from the same cache as the search runs (bench/search.py).

    python bench/bilateral_probe.py --set model.backbone.name=efficientnet_lite2 \
        --set model.backbone.image_size=512 --set model.backbone.pooling=gem
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe import branch_data, designs, probe_arguments, run_probe  # noqa: E402


def breast_features(data) -> tuple[dict[str, np.ndarray], dict[str, int], dict[str, str]]:
    """case id -> mean plain-image feature over its MG views; case -> label; case -> group."""
    feats, labels, groups = {}, {}, {}
    for inst in data.instances:
        views = [data.features[r.path][0] for r in inst.mg if r is not None and r.path in data.features]
        if views:
            feats[inst.case_id] = np.mean(views, axis=0)
            labels[inst.case_id], groups[inst.case_id] = inst.label.index, inst.group
    return feats, labels, groups


def contralateral(feats: dict[str, np.ndarray], groups: dict[str, str]) -> dict[str, np.ndarray | None]:
    by_group: dict[str, list[str]] = {}
    for case, g in groups.items():
        by_group.setdefault(g, []).append(case)
    return {case: next((feats[o] for o in by_group[groups[case]] if o != case), None) for case in feats}


def main() -> None:
    args = probe_arguments(__doc__, ("cdd-cesm",), folds=3)
    _, data = branch_data(args.data, args.sets, "mg-frozen-128", bilateral=False)  # the first CPU preset's MG row
    feats, labels, groups = breast_features(data)
    other = contralateral(feats, groups)
    print(f"{len(feats)} breasts, {sum(o is not None for o in other.values())} with the other breast")
    run_probe("bilateral_probe", data.splits[: args.folds], designs(feats, other), labels, (0.01, 0.1, 1.0),
              overrides=args.sets)


if __name__ == "__main__":
    main()
