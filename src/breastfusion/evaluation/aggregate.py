"""Patient-level aggregation of instance predictions (method.md, "Inputs per patient").

* vote: majority of the instances' predicted classes; a tie is broken by the
  mean softmax probability of the tied classes (our choice).
* mean: the class of the mean probability.
Both report the mean probability as the patient's continuous score (for AUC).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..vocab import CLASS_NAMES, N_CLASSES

PROBA_COLUMNS = [f"p_{c}" for c in CLASS_NAMES]
LOGIT_COLUMNS = [f"logit_{c}" for c in CLASS_NAMES]


def vote(proba: np.ndarray) -> int:
    """Majority vote over rows of (k, 3) probabilities; ties -> highest mean probability among the tied."""
    counts = np.bincount(proba.argmax(axis=1), minlength=N_CLASSES)
    tied = np.flatnonzero(counts == counts.max())
    if len(tied) == 1:
        return int(tied[0])
    mean = proba.mean(axis=0)
    return int(tied[np.argmax(mean[tied])])


def aggregate(instances: pd.DataFrame, method: str = "vote") -> pd.DataFrame:
    """Instance rows (case_id, label, p_*, [fold]) -> one row per case with pred and mean p_*."""
    if method not in ("vote", "mean"):
        raise ValueError(f"aggregation {method!r} not in (vote, mean)")
    keys = [k for k in ("fold", "case_id") if k in instances.columns]
    proba_all = instances[PROBA_COLUMNS].to_numpy(dtype=float)
    labels = instances["label"].to_numpy()
    groups = sorted(instances.groupby(keys, sort=False).indices.items(), key=lambda kv: kv[1][0])
    rows = []
    for key, positions in groups:  # in order of first appearance, as the instance table
        proba = proba_all[positions]
        mean = proba.mean(axis=0)
        pred = vote(proba) if method == "vote" else int(np.argmax(mean))
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        row.update({"label": int(labels[positions[0]]), "pred": pred, "n_instances": len(positions)})
        row.update(dict(zip(PROBA_COLUMNS, mean, strict=True)))
        rows.append(row)
    return pd.DataFrame(rows)
