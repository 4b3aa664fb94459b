"""Probability calibration and clinical operating points for patient-level 3-class triage.

Calibration: temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural
Networks", ICML) divides all logits by one scalar T > 0 fitted by minimising the negative
log-likelihood on held-out data; it leaves the argmax (and every AUC) unchanged and only
sharpens (T < 1) or softens (T > 1) the probabilities. Calibration is measured by the
top-label expected calibration error (ECE, same paper) and shown as a reliability diagram.

Operating points: two thresholds on calibrated patient probabilities turn them into
three actions, see `OperatingPoints` and `decide`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.optimize import minimize_scalar  # noqa: E402
from scipy.special import logsumexp  # noqa: E402

from ..files import atomic_path  # noqa: E402
from ..vocab import N_CLASSES, Label  # noqa: E402
from .aggregate import LOGIT_COLUMNS, PROBA_COLUMNS, aggregate  # noqa: E402

RECALL = "recall: suspected malignant"
ROUTINE = "routine: normal"
REVIEW = "review"

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


# ---------------------------------------------------------------- reliability diagram


def plot_reliability(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], path: str | Path, bins: int = 15) -> Path:
    """Reliability diagram PNG: accuracy against mean confidence per bin, one line per (name, probs, labels).

    The legend gives each curve's ECE; the dashed diagonal is perfect calibration; the lower
    panel is a histogram of the top-label confidences of every curve.
    """
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(4.8, 5.6), sharex=True, gridspec_kw={"height_ratios": (3, 1)}
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    edges = np.linspace(0, 1, bins + 1)
    for name, probs, labels in curves:
        table = reliability(probs, labels, bins)
        ece = expected_calibration_error(probs, labels, bins)
        conf, acc = [r["confidence"] for r in table], [r["accuracy"] for r in table]
        (line,) = top.plot(conf, acc, marker="o", label=f"{name} (ECE {ece:.1%})")
        confidence, _ = _confidence_correct(probs, labels)
        bottom.hist(confidence, bins=edges, histtype="step", color=line.get_color())
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title="reliability")
    top.legend(loc="upper left", fontsize="small")
    bottom.set(xlabel="confidence", ylabel="cases")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------- operating points


@dataclass
class OperatingPoints:
    """Two thresholds on patient probabilities, chosen on one cohort, and what they achieved there.

    Malignant "recall" call: p_malignant >= malignant_threshold. Its sensitivity is the share
    of malignant cases called, its specificity the share of non-malignant cases not called.
    The threshold is the LARGEST value whose sensitivity still meets the target, so that
    specificity is as high as possible; None (never called) when the cohort has no malignant case.

    Normal "routine / rule-out" call: p_normal >= normal_threshold and the case was not called
    malignant (the malignant call takes precedence, exactly as in `decide`). Its specificity
    is the share of ABNORMAL (benign or malignant) cases NOT called normal, its sensitivity the
    share of normal cases called normal. The threshold is the SMALLEST observed p_normal whose
    specificity meets the target (as many normals as possible are ruled out while at most
    1 - target of the abnormal cases are let through); None when no such threshold calls any
    case, or when the cohort has no normal or no abnormal case.

    Achieved rates are those of the calls as made (a None threshold calls nobody); NaN where
    the rate's denominator is empty. `note` says why a threshold is None.
    """

    malignant_threshold: float | None
    target_malignant_sensitivity: float
    malignant_sensitivity: float
    malignant_specificity: float
    normal_threshold: float | None
    target_normal_specificity: float
    normal_specificity: float
    normal_sensitivity: float
    n_cases: int
    note: str = ""

    def to_dict(self) -> dict:
        """Plain JSON values (floats, None, int, str); NaN stays NaN."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> OperatingPoints:
        """Inverse of `to_dict`; raises ValueError on missing or unknown keys."""
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d and n != "note"]
        unknown = sorted(set(d) - set(names))
        if missing or unknown:
            raise ValueError(f"operating points: missing keys {missing}, unknown keys {unknown}")

        def number(key: str) -> float | None:
            return None if d[key] is None else float(d[key])

        return cls(
            **{n: number(n) for n in names if n not in ("n_cases", "note")},
            n_cases=int(d["n_cases"]),
            note=str(d.get("note", "")),
        )


def _rate(called: np.ndarray, among: np.ndarray) -> float:
    """Share of the cases in `among` that are `called`; NaN when `among` is empty."""
    return float(called[among].mean()) if among.any() else float("nan")


def _largest_meeting_sensitivity(scores: np.ndarray, positive: np.ndarray, target: float) -> float:
    """Largest observed score t with share(positive & score >= t) / n_positive >= target; positives must exist."""
    pos = np.sort(scores[positive])
    candidates = np.unique(scores)
    sensitivity = (len(pos) - np.searchsorted(pos, candidates, side="left")) / len(pos)
    return float(candidates[sensitivity >= target][-1])  # the lowest score always gives sensitivity 1


def _smallest_meeting_specificity(
    scores: np.ndarray, negative: np.ndarray, eligible: np.ndarray, target: float
) -> float | None:
    """Smallest observed score t with share(negatives not (eligible & score >= t)) >= target; None if none."""
    n_negative = int(negative.sum())
    let_through = np.sort(scores[negative & eligible])
    candidates = np.unique(scores)
    called = len(let_through) - np.searchsorted(let_through, candidates, side="left")
    valid = candidates[(n_negative - called) / n_negative >= target]
    return float(valid[0]) if len(valid) else None


def _malignant_point(p_mal: np.ndarray, malignant: np.ndarray, target: float) -> tuple[float | None, str]:
    if not malignant.any():
        return None, "no malignant case: malignant threshold not set"
    return _largest_meeting_sensitivity(p_mal, malignant, target), ""


def _normal_point(
    p_normal: np.ndarray, normal: np.ndarray, eligible: np.ndarray, target: float
) -> tuple[float | None, str]:
    if not normal.any() or normal.all():
        return None, f"no {'abnormal' if normal.any() else 'normal'} case: normal threshold not set"
    threshold = _smallest_meeting_specificity(p_normal, ~normal, eligible, target)
    if threshold is None or not (eligible & (p_normal >= threshold)).any():
        return None, f"no threshold on p_normal calls any case normal with specificity >= {target:g}"
    return threshold, ""


def choose_operating_points(
    probs: np.ndarray,
    labels: np.ndarray,
    target_malignant_sensitivity: float = 0.95,
    target_normal_specificity: float = 0.95,
) -> OperatingPoints:
    """Choose the malignant and normal thresholds on patient probabilities (N, 3); see `OperatingPoints`."""
    target_mal = _check_target("target_malignant_sensitivity", target_malignant_sensitivity)
    target_norm = _check_target("target_normal_specificity", target_normal_specificity)
    p = np.asarray(probs, dtype=float).reshape(-1, N_CLASSES)
    y = np.asarray(labels).astype(int).reshape(-1)
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"expected probs (N, {N_CLASSES}) and labels (N,), got {p.shape} and {y.shape}")
    malignant, normal = y == _MALIGNANT, y == _NORMAL

    mal_threshold, mal_note = _malignant_point(p[:, _MALIGNANT], malignant, target_mal)
    recall = p[:, _MALIGNANT] >= mal_threshold if mal_threshold is not None else np.zeros(len(y), dtype=bool)
    norm_threshold, norm_note = _normal_point(p[:, _NORMAL], normal, ~recall, target_norm)
    routine = ~recall & (p[:, _NORMAL] >= norm_threshold) if norm_threshold is not None else np.zeros_like(recall)

    return OperatingPoints(
        malignant_threshold=mal_threshold,
        target_malignant_sensitivity=target_mal,
        malignant_sensitivity=_rate(recall, malignant),
        malignant_specificity=_rate(~recall, ~malignant),
        normal_threshold=norm_threshold,
        target_normal_specificity=target_norm,
        normal_specificity=_rate(~routine, ~normal),
        normal_sensitivity=_rate(routine, normal),
        n_cases=int(len(y)),
        note="; ".join(n for n in (mal_note, norm_note) if n),
    )


def decide(probs_row: Sequence[float], points: OperatingPoints) -> str:
    """One patient's action: RECALL if p_malignant >= its threshold, else ROUTINE if p_normal >= its, else REVIEW."""
    p = np.asarray(probs_row, dtype=float).reshape(-1)
    if p.shape != (N_CLASSES,):
        raise ValueError(f"expected {N_CLASSES} probabilities, got shape {p.shape}")
    if points.malignant_threshold is not None and p[_MALIGNANT] >= points.malignant_threshold:
        return RECALL
    if points.normal_threshold is not None and p[_NORMAL] >= points.normal_threshold:
        return ROUTINE
    return REVIEW


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
