from collections import Counter

import numpy as np
import pytest

from breastfusion.training.splits import assign_folds, make_splits


def _cohort(n=200, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=n, p=[0.53, 0.36, 0.11])
    ids = [f"P{i:03d}:L" for i in range(n)]
    return ids, labels


def test_folds_disjoint_stratified_70_20_10_each_case_validated_once():
    ids, labels = _cohort()
    fold_of = assign_folds(ids, labels, ids, n_folds=10, seed=3)
    splits = make_splits(fold_of, 10, 2)
    assert len(splits) == 10
    validated = Counter()
    label_of = dict(zip(ids, labels, strict=True))
    overall = np.bincount(labels, minlength=3) / len(labels)
    for s in splits:
        train, test, val = set(s.train), set(s.test), set(s.val)
        assert not (train & test or train & val or test & val)
        assert train | test | val == set(ids)
        assert abs(len(val) / len(ids) - 0.10) < 0.02
        assert abs(len(test) / len(ids) - 0.20) < 0.02
        assert abs(len(train) / len(ids) - 0.70) < 0.02
        validated.update(val)
        for part in (val, test, train):
            frac = np.bincount([label_of[c] for c in part], minlength=3) / len(part)
            assert np.abs(frac - overall).max() < 0.06  # stratified
    assert set(validated) == set(ids) and set(validated.values()) == {1}


def test_groups_never_straddle_folds():
    ids, labels = _cohort(120)
    groups = [f"W{i // 2}" for i in range(len(ids))]  # two breasts of one woman
    fold_of = assign_folds(ids, labels, groups, n_folds=10, seed=0)
    by_group = {}
    for cid, g in zip(ids, groups, strict=True):
        by_group.setdefault(g, set()).add(fold_of[cid])
    assert all(len(f) == 1 for f in by_group.values())


def test_same_seed_same_folds_other_seed_other_folds():
    ids, labels = _cohort()
    a = assign_folds(ids, labels, ids, 10, seed=1)
    assert a == assign_folds(ids, labels, ids, 10, seed=1)
    assert a != assign_folds(ids, labels, ids, 10, seed=2)


def test_too_few_groups_is_a_clear_error():
    from breastfusion.errors import BreastFusionError

    with pytest.raises(BreastFusionError, match="cannot fill 10 folds"):
        assign_folds(["a", "b"], [0, 1], ["a", "b"], 10)
