"""Checks of a cross-validated row that hold on any data, learnable or not.

A row that only "ran" passes a check that the confusion matrix sums to the number of
cases even when every prediction is the same. These checks fail on constant predictions,
on predictions that are not probability distributions, on labels mixed up between cases,
and on metrics that do not follow from the prediction files (recomputed here with
scikit-learn, independently of breastfusion.evaluation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, roc_auc_score

from breastfusion.evaluation.aggregate import PROBA_COLUMNS
from breastfusion.experiment import row_dirname
from breastfusion.records import Manifest
from breastfusion.vocab import CLASS_NAMES


def check_cv_row(run_dir: str | Path, entry: dict, manifest: Manifest, min_spread: float = 1e-3) -> pd.DataFrame:
    """`entry`: the row's item of metrics["rows"]. Returns the row's instance predictions."""
    row_dir = Path(run_dir) / "rows" / row_dirname(entry["name"])
    instances = pd.read_csv(row_dir / "predictions_instances.csv")
    patients = pd.read_csv(row_dir / "predictions_patients.csv")
    proba = instances[PROBA_COLUMNS].to_numpy(float)
    assert np.allclose(proba.sum(axis=1), 1, atol=1e-4) and (proba >= 0).all()
    spread = proba.max(axis=0) - proba.min(axis=0)
    assert (spread > min_spread).all(), f"{entry['name']}: the same probabilities for every instance {spread}"
    # every case validated exactly once, with its own label
    labels = {cid: case.label.index for cid, case in manifest.cases().items()}
    assert sorted(patients["case_id"]) == sorted(set(instances["case_id"]))
    assert patients["case_id"].is_unique
    assert all(labels[c] == y for c, y in zip(instances["case_id"], instances["label"], strict=True))
    # the patient table is the instances' majority vote (ties: highest mean probability)
    for cid, group in instances.groupby("case_id"):
        p = group[PROBA_COLUMNS].to_numpy(float)
        votes = np.bincount(p.argmax(axis=1), minlength=len(CLASS_NAMES))
        tied = np.flatnonzero(votes == votes.max())
        expected = tied[np.argmax(p.mean(axis=0)[tied])]
        assert patients.loc[patients["case_id"] == cid, "pred"].item() == expected, cid
    # metrics.json follows from the tables: confusion summed over folds, AUC averaged over folds
    cm = confusion_matrix(patients["label"], patients["pred"], labels=list(range(len(CLASS_NAMES))))
    assert cm.tolist() == entry["patient"]["confusion"]
    for k, name in enumerate(CLASS_NAMES):
        per_fold = [roc_auc_score(f["label"] == k, f[PROBA_COLUMNS[k]]) for _, f in patients.groupby("fold")
                    if 0 < (f["label"] == k).sum() < len(f)]
        if per_fold:
            assert np.isclose(np.mean(per_fold), entry["patient"]["auc"][name]["mean"]), name
    return instances
