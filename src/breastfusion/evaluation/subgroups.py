"""Does the model hold in every subgroup: per-class AUC with its interval per value of an optional
manifest column (age bin, manufacturer, device model, density, dataset source).

A class with fewer than `MIN_PER_CLASS` patients in a subgroup (or fewer than that many patients
of the other classes) is reported as too small, not as a number: an AUC over a handful of
patients is noise, and a small cell can identify people.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from ..vocab import CLASS_NAMES
from .intervals import Bootstrap, patient_intervals

MIN_PER_CLASS = 10
UNKNOWN = "unknown"


def subgroup_performance(patients: pd.DataFrame, values: Mapping[str, str], bootstrap: Bootstrap) -> dict:
    """{subgroup value: {"n": patients, "auc": {class: interval dict, or a "too small" text}}} of a
    patient table (case_id, label, p_*), patients grouped by `values` (case_id -> value; missing
    or empty -> "unknown")."""
    groups = patients["case_id"].map(lambda c: values.get(c) or UNKNOWN)
    out = {}
    for value in sorted(groups.unique()):
        table = patients[(groups == value).to_numpy()]
        labels = table["label"].to_numpy(dtype=int)
        aucs = patient_intervals(table, bootstrap)["auc"]
        entry: dict = {"n": int(len(table)), "auc": {}}
        for k, c in enumerate(CLASS_NAMES):
            positives, negatives = int(np.sum(labels == k)), int(np.sum(labels != k))
            if min(positives, negatives) < MIN_PER_CLASS:
                entry["auc"][c] = f"too small ({c} {_count(positives)}, others {_count(negatives)})"
            else:
                entry["auc"][c] = aucs[c]
        out[value] = entry
    return out


def _count(n: int) -> str:
    return "<5" if 0 < n < 5 else str(n)
