import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from breastfusion.evaluation.aggregate import PROBA_COLUMNS, aggregate, vote
from breastfusion.evaluation.metrics import classification_metrics, mean_std, per_class_auc, summarize_folds


def test_per_class_auc_equals_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    logits = rng.normal(size=(60, 3)) + np.eye(3)[y]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ours = per_class_auc(y, proba)
    theirs = roc_auc_score(y, proba, multi_class="ovr", average=None)
    assert np.allclose(list(ours.values()), theirs)


def test_known_auc_and_confusion():
    y = np.array([0, 0, 1, 1, 2, 2])
    proba = np.array([[.9, .05, .05], [.6, .3, .1], [.2, .7, .1], [.5, .4, .1], [.1, .1, .8], [.3, .3, .4]])
    m = classification_metrics(y, proba.argmax(1), proba)
    assert m["auc"]["normal"] == pytest.approx(1.0)  # normal scores .9 .6 above all others (.5 max)
    assert m["auc"]["malignant"] == pytest.approx(1.0)
    assert m["confusion"] == [[2, 0, 0], [1, 1, 0], [0, 0, 2]]
    assert m["recall"]["benign"] == pytest.approx(0.5)
    assert m["precision"]["normal"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(5 / 6)


def test_auc_nan_when_class_absent_and_mean_std_ignores_it():
    y = np.array([0, 0, 1, 1])
    proba = np.full((4, 3), 1 / 3)
    assert np.isnan(per_class_auc(y, proba)["malignant"])
    assert mean_std([0.5, float("nan"), 1.0]) == {"mean": 0.75, "std": 0.25, "n": 2}


def test_majority_vote_and_ties():
    assert vote(np.array([[.6, .3, .1], [.7, .2, .1], [.1, .1, .8]])) == 0
    # tie between normal (1 vote) and malignant (1 vote): mean prob decides -> malignant
    assert vote(np.array([[.5, .1, .4], [.05, .05, .9]])) == 2
    # three-way tie: highest mean among the tied (benign: mean .393)
    assert vote(np.array([[.34, .33, .33], [.2, .45, .35], [.1, .4, .5]])) == 1


def test_aggregate_vote_and_mean_per_fold_and_case():
    rows = pd.DataFrame({
        "fold": [0, 0, 0, 1], "case_id": ["a", "a", "a", "b"], "label": [2, 2, 2, 0],
        "p_normal": [.5, .5, 0, .9], "p_benign": [.1, .1, 0, .05], "p_malignant": [.4, .4, 1.0, .05],
    })
    by_vote = aggregate(rows, "vote").set_index("case_id")
    by_mean = aggregate(rows, "mean").set_index("case_id")
    assert by_vote.loc["a", "pred"] == 0  # two of three instances say normal
    assert by_mean.loc["a", "pred"] == 2  # mean p: normal .33, malignant .6
    assert by_vote.loc["a", "n_instances"] == 3
    assert np.allclose(by_vote.loc["a", PROBA_COLUMNS].to_numpy(dtype=float), [1 / 3, 0.2 / 3, 1.8 / 3])
    assert by_vote.loc["b", "pred"] == 0 and by_vote.loc["b", "fold"] == 1


def test_summarize_folds_sums_confusion():
    y = np.array([0, 1, 2])
    p = np.eye(3)
    f = classification_metrics(y, y, p)
    s = summarize_folds([f, f])
    assert s["confusion"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    assert s["accuracy"] == {"mean": 1.0, "std": 0.0, "n": 2}
    assert s["macro_auc"]["mean"] == 1.0
