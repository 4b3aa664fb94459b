"""Confidence intervals and paired comparisons (evaluation/intervals.py, evaluation/paired.py)
on generated patient tables whose true AUCs are known."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from breastfusion.evaluation.aggregate import PROBA_COLUMNS
from breastfusion.evaluation.intervals import Bootstrap, auc_by_ranks, patient_intervals, rate_intervals
from breastfusion.evaluation.paired import (
    compare_rows,
    comparison_pairs,
    delong_difference,
    delong_interval,
    holm,
    paired_comparisons,
)


def binormal_rows(rng, n: int, shifts: tuple[float, ...], shared: float = 1.0, noise: float = 1.0):
    """Labels 0/1/2 and, per row, 3-class scores: class k's score is shift * [label == k] + a
    latent shared by the rows (so they are correlated) + the row's own noise. One-vs-rest AUC of
    each class is then Phi(shift / sqrt(2 (shared^2 + noise^2))) for every class."""
    labels = rng.integers(0, 3, size=n)
    latent = rng.normal(scale=shared, size=(n, 3))
    tables = []
    for shift in shifts:
        logits = shift * np.eye(3)[labels] + latent + rng.normal(scale=noise, size=(n, 3))
        p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        table = pd.DataFrame(p, columns=PROBA_COLUMNS)
        table.insert(0, "label", labels)
        table.insert(0, "case_id", [f"c{i}" for i in range(n)])
        tables.append(table)
    return tables


def true_auc(shift: float, shared: float = 1.0, noise: float = 1.0) -> float:
    """One-vs-rest AUC of a score that is monotone in logit_k - logsumexp(others): by symmetry
    computed by simulation once, large n."""
    rng = np.random.default_rng(12345)
    (t,) = binormal_rows(rng, 400_000, (shift,), shared, noise)
    return roc_auc_score(t["label"] == 0, t[PROBA_COLUMNS[0]])


def test_rank_auc_equals_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(4, 60)).astype(float)
    positive = rng.random(60) < 0.3
    expected = [roc_auc_score(positive, s) for s in scores]
    assert np.allclose(auc_by_ranks(scores, positive), expected)


def test_bootstrap_keeps_class_counts_and_is_seeded():
    labels = np.array([0] * 5 + [1] * 7 + [2] * 3)
    rows = Bootstrap(resamples=200, seed=3).indices(labels)
    assert rows.shape == (200, 15)
    assert (np.sort(labels[rows], axis=1) == np.sort(labels)).all()
    assert (Bootstrap(resamples=200, seed=3).indices(labels) == rows).all()
    assert not (Bootstrap(resamples=200, seed=4).indices(labels) == rows).all()
    with pytest.raises(ValueError):
        Bootstrap(resamples=10)


def test_bootstrap_intervals_agree_with_independent_ones_on_300_patients():
    rng = np.random.default_rng(1)
    (table,) = binormal_rows(rng, 300, (1.5,))
    table["pred"] = table[PROBA_COLUMNS].to_numpy().argmax(axis=1)
    out = patient_intervals(table, Bootstrap(resamples=2000, seed=0))
    for k, c in enumerate(("normal", "benign", "malignant")):
        ours, theirs = out["auc"][c], delong_interval(table[PROBA_COLUMNS[k]].to_numpy(), table["label"] == k)
        assert ours["value"] == pytest.approx(theirs["value"])
        assert abs(ours["low"] - theirs["low"]) < 0.01 and abs(ours["high"] - theirs["high"]) < 0.01, (ours, theirs)
    correct = (table["pred"] == table["label"]).to_numpy(float)
    ref = stats.bootstrap((correct,), np.mean, n_resamples=2000, method="percentile",
                          random_state=np.random.default_rng(0)).confidence_interval
    assert abs(out["accuracy"]["low"] - ref.low) < 0.01 and abs(out["accuracy"]["high"] - ref.high) < 0.01
    assert out["auc"]["normal"]["low"] < out["auc"]["normal"]["value"] < out["auc"]["normal"]["high"]
    assert out["n"] == 300 and out["resamples"] == 2000


def test_rate_intervals_cover_the_share():
    labels = np.array([0] * 50 + [2] * 50)
    called = np.r_[np.zeros(45, bool), np.ones(5, bool), np.ones(40, bool), np.zeros(10, bool)]
    out = rate_intervals({"sensitivity": called}, labels, Bootstrap(resamples=500), {"sensitivity": labels == 2})
    s = out["sensitivity"]
    assert s["value"] == pytest.approx(0.8) and s["low"] < 0.8 < s["high"] and s["high"] - s["low"] < 0.3


def test_paired_test_finds_a_known_difference_with_coverage():
    """Row a is better than row b by a known AUC margin; the paired interval covers it in at
    least 90 of 100 seeded cohorts, and has the right sign."""
    truth = true_auc(2.0) - true_auc(1.2)
    covered = right_sign = 0
    for seed in range(100):
        a, b = binormal_rows(np.random.default_rng(seed), 300, (2.0, 1.2))
        d = compare_rows(a, b)["normal"]
        covered += d["low"] <= truth <= d["high"]
        right_sign += d["low"] > 0
    assert covered >= 90, covered
    assert right_sign >= 90, right_sign


def test_paired_test_finds_nothing_where_rows_are_the_same():
    a, _ = binormal_rows(np.random.default_rng(0), 300, (1.5, 1.5))
    same = compare_rows(a, a.copy())
    for c in ("normal", "benign", "malignant"):
        assert same[c]["difference"] == 0 and same[c]["p"] == 1.0
    false_alarms = 0
    for seed in range(100):  # equally good rows with their own noise: about 5% false alarms
        a, b = binormal_rows(np.random.default_rng(seed), 300, (1.5, 1.5))
        false_alarms += compare_rows(a, b)["malignant"]["p"] < 0.05
    assert false_alarms <= 12, false_alarms


def test_delong_difference_matches_a_paired_bootstrap():
    a, b = binormal_rows(np.random.default_rng(7), 300, (2.0, 1.5))
    positive = (a["label"] == 2).to_numpy()
    d = delong_difference(a["p_malignant"].to_numpy(), b["p_malignant"].to_numpy(), positive)
    rows = Bootstrap(resamples=2000, seed=1).indices(positive.astype(int))
    diffs = (auc_by_ranks(a["p_malignant"].to_numpy()[rows], positive[rows[0]])
             - auc_by_ranks(b["p_malignant"].to_numpy()[rows], positive[rows[0]]))
    low, high = np.percentile(diffs, [2.5, 97.5])
    assert abs(d["low"] - low) < 0.01 and abs(d["high"] - high) < 0.01


def test_holm():
    assert holm([0.01, 0.04, 0.03, float("nan")])[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert np.isnan(holm([0.01, float("nan")])[1])


def _row(name, modalities, **design):
    base = {"fusion": "concat", "arcface": True, "mg_slots": ["CC_2D"], "backbone": "resnet50", "head": "paper",
            "attention_heads": 8, "l2_normalize": False}
    return {"name": name, "modalities": modalities, **base, **design}


def test_comparison_pairs_fusion_against_single_rows_and_one_factor_ablations():
    rows = [_row("single US", ["US"]), _row("single MG", ["MG"]), _row("concat MM", ["MG", "US"]),
            _row("concat MM without ArcFace", ["MG", "US"], arcface=False),
            _row("cross-attn MM", ["MG", "US"], fusion="cross_attention"),
            _row("cross-attn MM without ArcFace", ["MG", "US"], fusion="cross_attention", arcface=False)]
    pairs = {(a, b) for a, b, _ in comparison_pairs(rows)}
    assert ("concat MM", "single US") in pairs and ("cross-attn MM", "single MG") in pairs
    assert ("concat MM without ArcFace", "concat MM") in pairs or ("concat MM", "concat MM without ArcFace") in pairs
    assert not {("concat MM", "cross-attn MM without ArcFace"), ("cross-attn MM without ArcFace", "concat MM")} & pairs
    assert not [p for p in pairs if p[0].startswith("single")]
    assert len(pairs) == 4 * 2 + 4


def test_paired_comparisons_adjust_over_all_pairs():
    a, b = binormal_rows(np.random.default_rng(2), 200, (2.0, 1.0))
    rows = [_row("single US", ["US"]), _row("concat MM", ["MG", "US"])]
    (out,) = paired_comparisons(rows, {"concat MM": a, "single US": b})
    assert out["a"] == "concat MM" and out["n"] == 200
    assert out["malignant"]["difference"] > 0 and out["malignant"]["p_holm"] >= out["malignant"]["p"]


def test_subgroups_report_small_classes_as_too_small():
    from breastfusion.evaluation.subgroups import subgroup_performance
    from breastfusion.experiment import subgroups
    from breastfusion.records import ImageRecord, Manifest
    from breastfusion.vocab import Label, Modality, Side

    (table,) = binormal_rows(np.random.default_rng(3), 240, (2.0,))
    labels = table["label"].to_numpy()
    small = set()
    for k, take in ((0, 30), (1, 30), (2, 6)):  # a site with only 6 malignant patients
        small |= set(table["case_id"][labels == k][:take])
    values = {c: "site A" if c in small else "site B" for c in table["case_id"]}
    out = subgroup_performance(table, values, Bootstrap(resamples=200))
    assert set(out) == {"site A", "site B"} and (out["site A"]["n"], out["site B"]["n"]) == (66, 174)
    assert out["site A"]["auc"]["malignant"] == "too small (malignant 6, others 60)"
    for site, cls in (("site A", "normal"), ("site B", "malignant")):
        auc = out[site]["auc"][cls]
        assert auc["low"] <= auc["value"] <= auc["high"]
    # ... everything from one grouping, then a manifest: only columns with two or more values count
    records = [ImageRecord(c.split(":")[0] if ":" in c else c, Side.LEFT, Modality.US, f"/x/{c}.png",
                           label=Label(["normal", "benign", "malignant"][y]), source="one", density=values[c][-1])
               for c, y in zip(table["case_id"], labels, strict=True)]
    manifest = Manifest(records)
    patients = table.assign(case_id=[r.case_id for r in records])
    got = subgroups(manifest, [("row", patients)], Bootstrap(resamples=200))
    assert list(got) == ["density"] and set(got["density"]["row"]) == {"A", "B"}
