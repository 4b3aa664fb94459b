"""Probability calibration and clinical operating points for patient-level 3-class triage.

Calibration: temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural
Networks", ICML) divides all logits by one scalar T > 0 fitted by minimising the negative
log-likelihood on held-out data; it leaves the argmax (and every AUC) unchanged and only
sharpens (T < 1) or softens (T > 1) the probabilities. Calibration is measured by the
top-label expected calibration error (ECE, same paper) and shown as a reliability diagram.

The clinical decision policy on calibrated probabilities is in decision.py, the reliability
diagram in plots.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.optimize import minimize_scalar  # noqa: E402
from scipy.special import logsumexp  # noqa: E402

from ..vocab import N_CLASSES, Label  # noqa: E402
from .aggregate import LOGIT_COLUMNS, PROBA_COLUMNS, aggregate  # noqa: E402

T_MIN = 0.05
T_MAX = 20.0

_NORMAL = Label.NORMAL.index
_MALIGNANT = Label.MALIGNANT.index


# ---------------------------------------------------------------- inputs


def _logits_labels(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to float (N, K) logits and int (N,) labels in [0, K)."""
    z = np.asarray(logits, dtype=float)
    y = np.asarray(labels).astype(int).reshape(-1)
    if z.size == 0 and y.size == 0:
        return z.reshape(0, N_CLASSES), y
    if z.ndim != 2 or z.shape[0] != y.shape[0]:
        raise ValueError(f"expected logits (N, K) and labels (N,), got {z.shape} and {y.shape}")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"labels must lie in [0, {z.shape[1]}), got range [{y.min()}, {y.max()}]")
    return z, y


def _check_target(name: str, value: float) -> float:
    """A target rate must lie in (0, 1]; raise ValueError naming the argument otherwise."""
    value = float(value)
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}")
    return value


# ---------------------------------------------------------------- temperature scaling


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature, stable (the row maximum is subtracted first)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    z = np.asarray(logits, dtype=float) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True) if z.size else z
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean -log softmax(logits / T)[label], computed with logsumexp; NaN for empty input."""
    z, y = _logits_labels(logits, labels)
    if not len(y):
        return float("nan")
    z = z / float(temperature)
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the single T > 0 minimising the mean NLL of softmax(logits / T).

    Bounded 1-D search over log T in [log 0.05, log 20] (scipy `minimize_scalar`, method
    "bounded"); the NLL is convex in 1/T, so the search finds the global minimum inside the
    bounds. Returns 1.0 (no change) for empty input.
    """
    z, y = _logits_labels(logits, labels)
    if not len(y):
        return 1.0
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(z, y, math.exp(log_t)),
        bounds=(math.log(T_MIN), math.log(T_MAX)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(result.x))


# ---------------------------------------------------------------- calibration error


def _confidence_correct(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidence max_k p_k and whether the argmax equals the label."""
    p = np.asarray(probs, dtype=float)
    y = np.asarray(labels).astype(int).reshape(-1)
    if p.size == 0:
        return np.zeros(0), np.zeros(0, dtype=bool)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"expected probs (N, K) and labels (N,), got {p.shape} and {y.shape}")
    return p.max(axis=1), p.argmax(axis=1) == y


def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins closed on the right, ((m-1)/M, m/M], as in Guo et al. 2017; 0 goes to bin 0."""
    return np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> list[dict]:
    """Reliability table: per non-empty equal-width confidence bin its edges, mean confidence, accuracy, count."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins!r}")
    confidence, correct = _confidence_correct(probs, labels)
    index = _bin_index(confidence, bins)
    rows = []
    for m in range(bins):
        inside = index == m
        if inside.any():
            rows.append({
                "lower": m / bins,
                "upper": (m + 1) / bins,
                "confidence": float(confidence[inside].mean()),
                "accuracy": float(correct[inside].mean()),
                "count": int(inside.sum()),
            })
    return rows


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017): sum over equal-width confidence bins of |acc - conf| * n_bin / N.

    NaN for empty input.
    """
    table = reliability(probs, labels, bins)
    n = sum(row["count"] for row in table)
    if not n:
        return float("nan")
    return float(sum(abs(row["accuracy"] - row["confidence"]) * row["count"] for row in table) / n)


@dataclass
class CalibrationSummary:
    """ECE and NLL of the same logits before (T = 1) and after temperature scaling."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float

    def to_dict(self) -> dict:
        return {k: float(v) for k, v in asdict(self).items()}


def summarize_calibration(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    """{"temperature", "ece_before", "ece_after", "nll_before", "nll_after"} on the given logits and labels."""
    z, y = _logits_labels(logits, labels)
    return CalibrationSummary(
        temperature=float(temperature),
        ece_before=expected_calibration_error(softmax(z), y),
        ece_after=expected_calibration_error(softmax(z, temperature), y),
        nll_before=negative_log_likelihood(z, y),
        nll_after=negative_log_likelihood(z, y, temperature),
    ).to_dict()


# ---------------------------------------------------------------- per fold of a CV run


def fold_temperature(test_table: pd.DataFrame) -> float:
    """Temperature fitted on one fold's TEST split (instance logits), never its validation fold."""
    return fit_temperature(test_table[LOGIT_COLUMNS].to_numpy(float), test_table["label"].to_numpy(int))


def calibrated_patients(table: pd.DataFrame, temperature: float) -> pd.DataFrame:
    """Instance logits -> temperature-scaled probabilities -> patient mean probabilities."""
    table = table.copy()
    table[PROBA_COLUMNS] = softmax(table[LOGIT_COLUMNS].to_numpy(float), temperature)
    return aggregate(table, "mean")


def calibrate_folds(folds: Sequence[tuple[pd.DataFrame, pd.DataFrame]]) -> tuple[pd.DataFrame, pd.DataFrame, list]:
    """(test split, validation fold) instance tables per fold -> patient tables of the validation
    folds before and after per-fold temperature scaling, and the temperatures."""
    before, after, temps = [], [], []
    for test, val in folds:
        t = fold_temperature(test)
        temps.append(t)
        before.append(calibrated_patients(val, 1.0))
        after.append(calibrated_patients(val, t))
    return pd.concat(before, ignore_index=True), pd.concat(after, ignore_index=True), temps
