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

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, append_jsonl, command, fold_means, quiet_logs  # noqa: E402

from breastfusion.config import override  # noqa: E402
from breastfusion.presets import cpu_reference, table3_rows  # noqa: E402
from breastfusion.provenance import git_commit, now  # noqa: E402
from breastfusion.records import read_manifest  # noqa: E402
from breastfusion.training.preparation import prepare  # noqa: E402


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


def design(cases, feats, other, bilateral: bool) -> np.ndarray:
    rows = []
    for c in cases:
        own = feats[c]
        if not bilateral:
            rows.append(own)
            continue
        has = other[c] is not None
        diff = own - other[c] if has else np.zeros_like(own)
        rows.append(np.concatenate([own, diff, [float(has)]]))
    return np.asarray(rows)


def macro_auc(y, p) -> float:
    return float(np.mean([roc_auc_score(y == k, p[:, k]) for k in range(3)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--folds", type=int, default=3)
    args = ap.parse_args()
    quiet_logs()
    (cfg,) = [r for r in table3_rows(cpu_reference(), "view") if r.name == "single MG"]
    for item in args.sets:
        key, _, value = item.partition("=")
        override(cfg, key, value)
    cfg.validate()
    data = prepare(read_manifest(ROOT / "runs" / "public" / "cdd-cesm.csv"), cfg, progress=False)
    feats, labels, groups = breast_features(data)
    other = contralateral(feats, groups)
    print(f"{len(feats)} breasts, {sum(o is not None for o in other.values())} with the other breast")
    result = {"command": command(), "commit": git_commit(), "finished": now(), "overrides": args.sets, "folds": []}
    for split in data.splits[: args.folds]:
        train = [c for c in split.train if c in feats]
        test = [c for c in split.test if c in feats]
        y_train = np.array([labels[c] for c in train])
        y_test = np.array([labels[c] for c in test])
        fold = {"fold": split.fold}
        for bilateral in (False, True):
            for c_reg in (0.01, 0.1, 1.0):
                clf = make_pipeline(StandardScaler(), LogisticRegression(C=c_reg, max_iter=3000))
                clf.fit(design(train, feats, other, bilateral), y_train)
                auc = macro_auc(y_test, clf.predict_proba(design(test, feats, other, bilateral)))
                fold[f"{'bilateral' if bilateral else 'own'} C={c_reg}"] = auc
        print(json.dumps(fold), flush=True)
        result["folds"].append(fold)
    result["mean"] = fold_means(result["folds"])
    for k, v in result["mean"].items():
        print(f"{k}: test-split macro AUC {v:.3f}")
    append_jsonl("bilateral_probe", result)


if __name__ == "__main__":
    main()
