"""How sure is each patient-level figure: 95% intervals by stratified bootstrap over patients.

The paper gives mean +- std over the validation folds. Each patient is predicted exactly once
across the folds, so the pooled out-of-fold table is one prediction per patient; resampling
its patients (with replacement, within each class, so every resample keeps the cohort's class
counts) and recomputing a metric gives its sampling distribution, and the 2.5th and 97.5th
percentiles of that distribution are the 95% interval (percentile bootstrap). The resampling
is seeded (`Bootstrap.seed`), so a report is reproduced exactly.

Why not `scipy.stats.bootstrap` itself: it resamples without strata, and a resample that draws
no patient of a class leaves that class's AUC undefined. The test suite checks these intervals
against independent ones (DeLong's variance for AUC, scipy's bootstrap for accuracy).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from ..vocab import CLASS_NAMES, N_CLASSES
from .aggregate import PROBA_COLUMNS
from .metrics import auc_by_ranks

METHOD = "percentile bootstrap over patients, stratified by class"


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are computed: resamples, seed and confidence level (one per experiment, so
    every row of a report is resampled alike)."""

    resamples: int = 2000
    seed: int = 0
    confidence: float = 0.95

    def __post_init__(self):
        if self.resamples < 100:
            raise ValueError(f"bootstrap resamples must be at least 100, not {self.resamples}")
        if not 0.5 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0.5, 1), not {self.confidence}")

    def to_dict(self) -> dict:
        return {**asdict(self), "method": METHOD}

    def indices(self, labels: np.ndarray) -> np.ndarray:
        """(resamples, n) positions into `labels`; every row draws, within each class, as many
        patients as the class has. Columns are ordered by class, so `labels[rows[0]]` is the
        class of every column in every row."""
        rng = np.random.default_rng(self.seed)
        labels = np.asarray(labels, dtype=int)
        blocks = [rng.choice(members, size=(self.resamples, len(members)), replace=True)
                  for k in range(N_CLASSES) if len(members := np.flatnonzero(labels == k))]
        return np.concatenate(blocks, axis=1)

    def interval(self, value: float, samples: np.ndarray) -> dict[str, float]:
        """The point estimate with the percentile interval of its bootstrap samples."""
        samples = np.asarray(samples, dtype=float)
        samples = samples[~np.isnan(samples)]
        if np.isnan(value) or not len(samples):
            return {"value": float("nan"), "low": float("nan"), "high": float("nan")}
        tail = 100 * (1 - self.confidence) / 2
        low, high = np.percentile(samples, [tail, 100 - tail])
        return {"value": float(value), "low": float(low), "high": float(high)}


def _class_aucs(proba: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(..., N_CLASSES) one-vs-rest AUCs of (..., n, N_CLASSES) probabilities."""
    return np.stack([auc_by_ranks(proba[..., k], labels == k) for k in range(N_CLASSES)], axis=-1)


def _macro(aucs: np.ndarray) -> np.ndarray:
    present = ~np.isnan(aucs)
    with np.errstate(invalid="ignore"):
        return np.where(present.any(axis=-1), np.nansum(aucs, axis=-1) / present.sum(axis=-1), np.nan)


def _rates(pred: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Sensitivity, specificity per class and accuracy of (..., n) decisions against (n,) labels."""
    out = {"sensitivity": [], "specificity": []}
    for k in range(N_CLASSES):
        positive = labels == k
        with np.errstate(invalid="ignore"):
            sens = (pred[..., positive] == k).mean(axis=-1) if positive.any() else np.full(pred.shape[:-1], np.nan)
            spec = (pred[..., ~positive] != k).mean(axis=-1) if (~positive).any() else np.full(pred.shape[:-1], np.nan)
        out["sensitivity"].append(sens)
        out["specificity"].append(spec)
    return {"sensitivity": np.stack(out["sensitivity"], axis=-1),
            "specificity": np.stack(out["specificity"], axis=-1),
            "accuracy": (pred == labels).mean(axis=-1)}


def patient_intervals(table: pd.DataFrame, bootstrap: Bootstrap) -> dict:
    """Pooled point estimates and intervals of a patient table (label, pred, p_* columns; one row
    per patient, every fold pooled): per-class AUC, macro AUC, per-class sensitivity and
    specificity of `pred`, accuracy."""
    labels = table["label"].to_numpy(dtype=int)
    proba = table[PROBA_COLUMNS].to_numpy(dtype=float)
    pred = table["pred"].to_numpy(dtype=int) if "pred" in table else proba.argmax(axis=1)
    rows = bootstrap.indices(labels)
    resampled_labels = labels[rows[0]]
    aucs, boot_aucs = _class_aucs(proba, labels), _class_aucs(proba[rows], resampled_labels)
    rates, boot_rates = _rates(pred, labels), _rates(pred[rows], resampled_labels)
    out: dict = {"n": int(len(labels)), **bootstrap.to_dict()}
    out["auc"] = {c: bootstrap.interval(aucs[k], boot_aucs[:, k]) for k, c in enumerate(CLASS_NAMES)}
    out["macro_auc"] = bootstrap.interval(float(_macro(aucs)), _macro(boot_aucs))
    for key in ("sensitivity", "specificity"):
        out[key] = {c: bootstrap.interval(rates[key][k], boot_rates[key][:, k]) for k, c in enumerate(CLASS_NAMES)}
    out["accuracy"] = bootstrap.interval(float(rates["accuracy"]), boot_rates["accuracy"])
    return out


def rate_intervals(called: dict[str, np.ndarray], labels: np.ndarray, bootstrap: Bootstrap,
                   among: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Shares with intervals: for each name, the share of `among[name]` patients (a boolean mask
    over the patients that depends on the label only, e.g. "the malignant ones") that
    `called[name]` holds, resampled as in `patient_intervals`."""
    labels = np.asarray(labels, dtype=int)
    rows = bootstrap.indices(labels)
    out = {}
    for name, mask in called.items():
        subset = among[name][rows[0]]
        if not subset.any():
            out[name] = bootstrap.interval(float("nan"), np.array([]))
            continue
        value = float(mask[among[name]].mean())
        out[name] = bootstrap.interval(value, mask[rows][:, subset].mean(axis=1))
    return out
