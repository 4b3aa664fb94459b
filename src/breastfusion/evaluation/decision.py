"""The clinical decision policy: two operating points on calibrated patient probabilities turn
them into three actions (recall: suspected malignant; routine: normal; review), chosen on the
test splits of a cross-validated row (never its validation folds) and applied by `decide`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from ..vocab import N_CLASSES, Label
from .calibration import _check_target
from .intervals import Bootstrap, rate_intervals

RECALL = "recall: suspected malignant"
ROUTINE = "routine: normal"
REVIEW = "review"

_NORMAL = Label.NORMAL.index
_MALIGNANT = Label.MALIGNANT.index


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




def lanes(probs: np.ndarray, points: OperatingPoints) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (recall, routine) masks of patient probabilities (N, 3), as `decide` calls each row."""
    p = np.asarray(probs, dtype=float).reshape(-1, N_CLASSES)
    recall = (p[:, _MALIGNANT] >= points.malignant_threshold if points.malignant_threshold is not None
              else np.zeros(len(p), dtype=bool))
    routine = (~recall & (p[:, _NORMAL] >= points.normal_threshold) if points.normal_threshold is not None
               else np.zeros(len(p), dtype=bool))
    return recall, routine


def operating_point_evidence(probs: np.ndarray, labels: np.ndarray, points: OperatingPoints,
                             bootstrap: Bootstrap | None = None) -> dict:
    """What fixed operating points achieve on a cohort, each figure with its bootstrap interval:
    the recall call's sensitivity and specificity for malignancy, the routine call's sensitivity
    for normal and specificity against abnormal, and the share of patients sent to each lane
    (recall, routine, review). Resampling keeps the cohort's class counts (stratified), so the
    lane shares' intervals are for a cohort of this class mix."""
    bootstrap = bootstrap or Bootstrap()
    y = np.asarray(labels).astype(int).reshape(-1)
    recall, routine = lanes(probs, points)
    malignant, normal, everyone = y == _MALIGNANT, y == _NORMAL, np.ones(len(y), dtype=bool)
    called = {"malignant_sensitivity": recall, "malignant_specificity": ~recall,
              "normal_sensitivity": routine, "normal_specificity": ~routine,
              "recall_share": recall, "routine_share": routine, "review_share": ~recall & ~routine}
    among = {"malignant_sensitivity": malignant, "malignant_specificity": ~malignant,
             "normal_sensitivity": normal, "normal_specificity": ~normal,
             "recall_share": everyone, "routine_share": everyone, "review_share": everyone}
    return {"n": int(len(y)), **bootstrap.to_dict(), **rate_intervals(called, y, bootstrap, among)}
