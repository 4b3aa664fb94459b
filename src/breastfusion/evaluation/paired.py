"""Is one row better than another on the same patients: DeLong's test for correlated ROC curves.

Two rows of an experiment predict the same patients (the folds are the same: same manifest,
same cv seed), so their AUCs are correlated and overlapping mean +- std bars say little. For
each class (one-vs-rest, patient mean probability as score) DeLong, DeLong & Clarke-Pearson
(Biometrics 1988) estimate the covariance of the two AUCs from the patients' placement values;
the difference then has a normal 95% interval and a two-sided p-value. Computed with midranks
(Sun & Xu, IEEE Signal Processing Letters 2014), O(n log n) per row.

Which pairs a report compares (`comparison_pairs`): every multimodal row against every
single-modality row ("does fusion help?"), and every two rows of the same modalities that
differ in exactly one design choice (fusion, ArcFace, MG images used, backbone, head,
attention heads, L2 normalisation): the paper's ablations against their reference row.
p-values are also given Holm-adjusted over all comparisons of a report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import norm, rankdata

from ..vocab import CLASS_NAMES
from .aggregate import PROBA_COLUMNS

METHOD = "DeLong's test for two correlated ROC curves (normal interval, two-sided p)"
ABLATION_FIELDS = ("fusion", "arcface", "mg_slots", "backbone", "head", "attention_heads", "l2_normalize")


def _placements(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs (k,) and placement values of positives (k, m) and negatives (k, n) of k score rows."""
    pos, neg = scores[:, positive], scores[:, ~positive]
    m, n = pos.shape[1], neg.shape[1]
    all_ranks = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    tx, ty = rankdata(pos, axis=1), rankdata(neg, axis=1)
    v10 = (all_ranks[:, :m] - tx) / n  # per positive: share of negatives scored below it
    v01 = 1 - (all_ranks[:, m:] - ty) / m  # per negative: share of positives scored above it
    return v10.mean(axis=1), v10, v01


def delong_covariance(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (k,) of k score rows (k, N) against a boolean `positive` (N,), and their covariance (k, k)."""
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    positive = np.asarray(positive, dtype=bool)
    aucs, v10, v01 = _placements(scores, positive)
    m, n = v10.shape[1], v01.shape[1]
    cov = np.atleast_2d(np.cov(v10, ddof=1)) / m + np.atleast_2d(np.cov(v01, ddof=1)) / n
    return aucs, cov


def delong_interval(scores: np.ndarray, positive: np.ndarray, confidence: float = 0.95) -> dict[str, float]:
    """One AUC with its DeLong normal interval."""
    (auc,), cov = delong_covariance(scores, positive)
    half = norm.ppf(0.5 + confidence / 2) * np.sqrt(cov[0, 0])
    return {"value": float(auc), "low": float(auc - half), "high": float(auc + half)}


def delong_difference(scores_a: np.ndarray, scores_b: np.ndarray, positive: np.ndarray,
                      confidence: float = 0.95) -> dict[str, float]:
    """AUC(a) - AUC(b) on the same patients: difference, interval, p-value (two-sided)."""
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        nan = float("nan")
        return {"auc_a": nan, "auc_b": nan, "difference": nan, "low": nan, "high": nan, "p": nan}
    (auc_a, auc_b), cov = delong_covariance(np.stack([scores_a, scores_b]), positive)
    diff = auc_a - auc_b
    var = max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0)
    if var <= 1e-15:  # identical rankings: no difference to find
        return {"auc_a": float(auc_a), "auc_b": float(auc_b), "difference": float(diff),
                "low": float(diff), "high": float(diff), "p": 1.0}
    sd = np.sqrt(var)
    half = norm.ppf(0.5 + confidence / 2) * sd
    return {"auc_a": float(auc_a), "auc_b": float(auc_b), "difference": float(diff),
            "low": float(diff - half), "high": float(diff + half), "p": float(2 * norm.sf(abs(diff) / sd))}


def compare_rows(a: pd.DataFrame, b: pd.DataFrame, confidence: float = 0.95) -> dict:
    """Per-class AUC difference of two patient tables (case_id, label, p_*), on the patients
    both rows predicted."""
    both = a.merge(b, on="case_id", suffixes=("_a", "_b"))
    if (both["label_a"] != both["label_b"]).any():
        raise ValueError("the two rows disagree on some patients' labels: not the same cohort")
    labels = both["label_a"].to_numpy(dtype=int)
    out: dict = {"n": int(len(both))}
    for k, c in enumerate(CLASS_NAMES):
        col = PROBA_COLUMNS[k]
        out[c] = delong_difference(both[f"{col}_a"].to_numpy(float), both[f"{col}_b"].to_numpy(float),
                                   labels == k, confidence)
    return out


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error) of a list of p-values; NaN stays NaN."""
    p = np.asarray(pvalues, dtype=float)
    valid = np.flatnonzero(~np.isnan(p))
    out = p.copy()
    order = valid[np.argsort(p[valid])]
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * p[j]))
        out[j] = running
    return out.tolist()


def _design(row: dict) -> dict:
    return {k: (tuple(row[k]) if isinstance(row.get(k), list) else row.get(k)) for k in ABLATION_FIELDS}


def comparison_pairs(rows: Sequence[dict]) -> list[tuple[str, str, str]]:
    """(row a, row b, why) for the rows (describe_row dicts) a report compares; see the module doc."""
    pairs = []
    for a in rows:
        for b in rows:
            if a is b:
                continue
            if len(a["modalities"]) > 1 and len(b["modalities"]) == 1:
                pairs.append((a["name"], b["name"], "fusion vs single modality"))
            elif a["modalities"] == b["modalities"] and a["name"] > b["name"]:
                da, db = _design(a), _design(b)
                changed = [k for k in ABLATION_FIELDS if da[k] != db[k]]
                if len(changed) == 1:
                    pairs.append((a["name"], b["name"], f"differ in {changed[0]}"))
    return pairs


def paired_comparisons(rows: Sequence[dict], patients: dict[str, pd.DataFrame],
                       confidence: float = 0.95) -> list[dict]:
    """Every comparison of `comparison_pairs` between rows that were run (`patients`: row name ->
    patient table), with Holm-adjusted p-values over all of them."""
    out = []
    for a, b, why in comparison_pairs([r for r in rows if r["name"] in patients]):
        out.append({"a": a, "b": b, "why": why, **compare_rows(patients[a], patients[b], confidence)})
    flat = [(i, c) for i in range(len(out)) for c in CLASS_NAMES]
    adjusted = holm([out[i][c]["p"] for i, c in flat])
    for (i, c), p in zip(flat, adjusted, strict=True):
        out[i][c]["p_holm"] = p
    return out
