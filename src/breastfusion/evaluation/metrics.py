"""Per-class one-vs-rest AUC, recall, precision, accuracy and confusion (method.md, evaluation)."""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import confusion_matrix

from ..vocab import CLASS_NAMES, N_CLASSES


def auc_by_ranks(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC (Mann-Whitney, ties count half) of every row of `scores` (..., n) against
    one fixed boolean `positive` (n,); NaN when either side is empty."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return np.full(np.shape(scores)[:-1], np.nan)
    ranks = rankdata(scores, axis=-1)
    return (ranks[..., positive].sum(axis=-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def per_class_auc(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """One-vs-rest AUC per class; NaN where the class (or its complement) is absent. Equal to
    scikit-learn's roc_auc_score (tests check) at a fraction of its cost, which matters where
    a test split is scored after every epoch."""
    y_true = np.asarray(y_true, dtype=int)
    proba = np.asarray(proba, dtype=float)
    return {name: float(auc_by_ranks(proba[:, k], y_true == k)) for k, name in enumerate(CLASS_NAMES)}


def macro_auc(y_true: np.ndarray, proba: np.ndarray) -> float:
    values = [v for v in per_class_auc(y_true, proba).values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray) -> dict:
    """Everything reported per fold: auc, recall, precision per class, accuracy, confusion."""
    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    cm = confusion_matrix(y_true, y_pred, labels=list(range(N_CLASSES)))
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        recall = np.diag(cm) / cm.sum(axis=1)
        precision = np.diag(cm) / cm.sum(axis=0)
    return {
        "auc": per_class_auc(y_true, proba),
        "recall": dict(zip(CLASS_NAMES, map(float, recall), strict=True)),
        "precision": dict(zip(CLASS_NAMES, map(float, precision), strict=True)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "confusion": cm.tolist(),
        "n": int(len(y_true)),
    }


def mean_std(values) -> dict[str, float]:
    """Mean +- std (population, ddof=0) over folds, ignoring NaN folds; `n` = folds counted."""
    arr = np.asarray(list(values), dtype=float)
    arr = arr[~np.isnan(arr)]
    if not len(arr):
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(len(arr))}


def summarize_folds(per_fold: list[dict]) -> dict:
    """Per-fold metric dicts -> mean/std of each scalar, confusion summed over folds."""
    out: dict = {}
    for key in ("auc", "recall", "precision"):
        out[key] = {c: mean_std(f[key][c] for f in per_fold) for c in CLASS_NAMES}
    out["accuracy"] = mean_std(f["accuracy"] for f in per_fold)
    out["macro_auc"] = mean_std(np.nanmean(list(f["auc"].values())) if not all(
        np.isnan(v) for v in f["auc"].values()) else np.nan for f in per_fold)
    out["confusion"] = np.sum([np.asarray(f["confusion"]) for f in per_fold], axis=0).tolist()
    return out
