from __future__ import annotations

import json
import math

import numpy as np
import pytest

from breastfusion.evaluation.calibration import (
    expected_calibration_error,
    fit_temperature,
    reliability,
    softmax,
    summarize_calibration,
)
from breastfusion.evaluation.decision import RECALL, REVIEW, ROUTINE, OperatingPoints, choose_operating_points, decide
from breastfusion.evaluation.plots import plot_reliability
from breastfusion.vocab import N_CLASSES, Label

MAL, NORM = Label.MALIGNANT.index, Label.NORMAL.index


def calibrated_logits(seed: int, n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """Logits z ~ N(0, 2^2) and labels drawn from softmax(z): calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, size=(n, N_CLASSES))
    cumulative = softmax(z).cumsum(axis=1)
    labels = (rng.random((n, 1)) > cumulative).sum(axis=1)
    return z, np.minimum(labels, N_CLASSES - 1)


def cohort(seed: int, n: int = 200, decimals: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Random 3-class cohort with informative probabilities; rounding creates tied scores."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, N_CLASSES, n)
    probs = softmax(rng.normal(size=(n, N_CLASSES)) + 2.0 * np.eye(N_CLASSES)[labels])
    return (np.round(probs, decimals) if decimals is not None else probs), labels


def achieved(probs: np.ndarray, labels: np.ndarray, points: OperatingPoints) -> dict[str, float]:
    """Rates recomputed from decide() on every row, independently of choose_operating_points."""
    actions = np.array([decide(row, points) for row in probs])
    recall, routine = actions == RECALL, actions == ROUTINE
    mal, norm = labels == MAL, labels == NORM
    return {
        "malignant_sensitivity": recall[mal].mean(),
        "malignant_specificity": (~recall[~mal]).mean(),
        "normal_specificity": (~routine[~norm]).mean(),
        "normal_sensitivity": routine[norm].mean(),
    }


def with_thresholds(points: OperatingPoints, **changes) -> OperatingPoints:
    return OperatingPoints.from_dict({**points.to_dict(), **changes})


# ---------------------------------------------------------------- temperature scaling


def test_fit_temperature_recovers_known_temperature_and_lowers_ece():
    z, y = calibrated_logits(seed=0)
    overconfident = 3.0 * z
    t = fit_temperature(overconfident, y)
    assert t == pytest.approx(3.0, rel=0.10)
    summary = summarize_calibration(overconfident, y, t)
    assert summary["temperature"] == t
    assert summary["ece_after"] < summary["ece_before"]
    assert summary["nll_after"] < summary["nll_before"]


def test_fit_temperature_is_one_for_calibrated_logits_and_empty_input():
    z, y = calibrated_logits(seed=1)
    assert fit_temperature(z, y) == pytest.approx(1.0, rel=0.10)
    assert fit_temperature(np.zeros((0, N_CLASSES)), np.zeros(0, dtype=int)) == 1.0


def test_softmax_is_stable_and_tempered():
    p = softmax(np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]]), temperature=2.0)
    assert np.isfinite(p).all()
    assert p.sum(axis=1) == pytest.approx([1.0, 1.0])
    e = np.exp(np.array([1.0, 2.0, 3.0]) / 2.0)
    assert p[1] == pytest.approx(e / e.sum())


# ---------------------------------------------------------------- ECE


def test_ece_equals_hand_computed_value():
    probs = np.array([
        [0.9, 0.05, 0.05],  # conf .9, correct   -> bin (0.8, 1.0]
        [0.9, 0.05, 0.05],  # conf .9, wrong     -> bin (0.8, 1.0]: conf .9, acc .5, n 2
        [0.3, 0.6, 0.1],  # conf .6, correct     -> bin (0.4, 0.6]
        [0.5, 0.4, 0.1],  # conf .5, wrong       -> bin (0.4, 0.6]: conf .55, acc .5, n 2
        [0.2, 0.1, 0.7],  # conf .7, correct     -> bin (0.6, 0.8]: conf .7, acc 1, n 1
    ])
    labels = np.array([0, 1, 1, 1, 2])
    # (2 * |.5 - .9| + 2 * |.5 - .55| + 1 * |1 - .7|) / 5 = (.8 + .1 + .3) / 5
    assert expected_calibration_error(probs, labels, bins=5) == pytest.approx(0.24)
    table = reliability(probs, labels, bins=5)
    assert [r["lower"] for r in table] == pytest.approx([0.4, 0.6, 0.8])
    assert [r["upper"] for r in table] == pytest.approx([0.6, 0.8, 1.0])
    assert [r["count"] for r in table] == [2, 1, 2]
    assert [r["accuracy"] for r in table] == pytest.approx([0.5, 1.0, 0.5])
    assert [r["confidence"] for r in table] == pytest.approx([0.55, 0.7, 0.9])
    assert math.isnan(expected_calibration_error(np.zeros((0, N_CLASSES)), np.zeros(0, dtype=int)))


# ---------------------------------------------------------------- operating points


@pytest.mark.parametrize(("seed", "decimals"), [(0, None), (1, None), (2, 2)])
def test_operating_points_meet_targets_with_extreme_thresholds(seed, decimals):
    probs, labels = cohort(seed, decimals=decimals)
    points = choose_operating_points(probs, labels, 0.95, 0.90)
    assert points.malignant_threshold is not None and points.normal_threshold is not None
    assert points.n_cases == len(labels) and points.note == ""

    rates = achieved(probs, labels, points)
    for key, value in rates.items():
        assert getattr(points, key) == pytest.approx(value), key
    assert rates["malignant_sensitivity"] >= 0.95
    assert rates["normal_specificity"] >= 0.90
    assert 0 < rates["normal_sensitivity"] < 1  # informative scores: a real trade-off, not a degenerate rule

    higher = np.unique(probs[:, MAL])
    higher = higher[higher > points.malignant_threshold].min()
    assert achieved(probs, labels, with_thresholds(points, malignant_threshold=higher))["malignant_sensitivity"] < 0.95

    lower = np.unique(probs[:, NORM])
    lower = lower[lower < points.normal_threshold].max()
    assert achieved(probs, labels, with_thresholds(points, normal_threshold=lower))["normal_specificity"] < 0.90


def test_no_malignant_case_leaves_threshold_unset_with_note():
    probs, labels = cohort(3)
    keep = labels != MAL
    points = choose_operating_points(probs[keep], labels[keep])
    assert points.malignant_threshold is None
    assert "malignant" in points.note
    assert math.isnan(points.malignant_sensitivity)
    assert points.normal_threshold is not None
    assert decide([0.0, 0.0, 1.0], points) != RECALL


def test_decide_precedence_and_round_trip():
    points = choose_operating_points(*cohort(4))
    above_both = [points.normal_threshold, 0.0, points.malignant_threshold]
    assert decide(above_both, points) == RECALL
    assert decide([points.normal_threshold, 0.0, 0.0], points) == ROUTINE
    assert decide([0.0, 1.0, 0.0], points) == REVIEW

    points.malignant_sensitivity = float("nan")
    text = json.dumps(points.to_dict())
    back = OperatingPoints.from_dict(json.loads(text))
    assert back.to_dict().keys() == points.to_dict().keys()
    for key, value in points.to_dict().items():
        other = getattr(back, key)
        assert other == value or (math.isnan(value) and math.isnan(other)), key
    with pytest.raises(ValueError, match="unknown"):
        OperatingPoints.from_dict({**points.to_dict(), "extra": 1})


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"target_malignant_sensitivity": 0.0}, "target_malignant_sensitivity"),
        ({"target_malignant_sensitivity": 1.5}, "target_malignant_sensitivity"),
        ({"target_normal_specificity": float("nan")}, "target_normal_specificity"),
    ],
)
def test_bad_target_raises_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        choose_operating_points(*cohort(5, n=20), **kwargs)


# ---------------------------------------------------------------- plot


def test_plot_reliability_writes_png(tmp_path):
    z, y = calibrated_logits(seed=6, n=500)
    path = plot_reliability(
        [("before calibration", softmax(3 * z), y), ("after calibration", softmax(3 * z, 3.0), y)],
        tmp_path / "plots" / "reliability.png",
    )
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_operating_point_evidence_counts_each_lane_with_intervals():
    from breastfusion.evaluation.decision import operating_point_evidence
    from breastfusion.evaluation.intervals import Bootstrap

    labels = np.array([0] * 40 + [1] * 30 + [2] * 30)
    probs = np.tile([0.2, 0.6, 0.2], (100, 1))
    probs[:30, :] = [0.8, 0.1, 0.1]  # 30 of 40 normals look normal
    probs[70:97, :] = [0.1, 0.1, 0.8]  # 27 of 30 malignant look malignant
    points = OperatingPoints(malignant_threshold=0.5, target_malignant_sensitivity=0.9, malignant_sensitivity=0.9,
                             malignant_specificity=1.0, normal_threshold=0.5, target_normal_specificity=0.95,
                             normal_specificity=1.0, normal_sensitivity=0.75, n_cases=100)
    e = operating_point_evidence(probs, labels, points, Bootstrap(resamples=500))
    assert e["malignant_sensitivity"]["value"] == pytest.approx(0.9)
    assert e["malignant_specificity"]["value"] == pytest.approx(1.0)
    assert e["normal_sensitivity"]["value"] == pytest.approx(0.75)
    assert (e["recall_share"]["value"], e["routine_share"]["value"], e["review_share"]["value"]) == \
        pytest.approx((0.27, 0.30, 0.43))
    s = e["malignant_sensitivity"]
    assert s["low"] < 0.9 < s["high"] and s["low"] > 0.7
    assert e["recall_share"]["low"] < 0.27 < e["recall_share"]["high"]
    assert e["n"] == 100 and e["resamples"] == 500
