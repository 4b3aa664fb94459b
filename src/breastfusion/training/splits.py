"""Patient-level, class-stratified, grouped folds (method.md, evaluation protocol).

Cases are dealt into `n_folds` equal folds by scikit-learn's
StratifiedGroupKFold (a group never straddles two folds). For fold k the
validation split is fold k, the test split the next `test_folds` folds
(cyclically) and the training split the rest: with 10 folds and 2 test folds
that is the paper's 70% / 20% / 10%, and every case is validated exactly once.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from ..errors import BreastFusionError, CohortError


@dataclass(frozen=True)
class FoldSplit:
    fold: int
    train: tuple[str, ...]
    test: tuple[str, ...]
    val: tuple[str, ...]


def assign_folds(case_ids: Sequence[str], labels: Sequence[int], groups: Sequence[str],
                 n_folds: int = 10, seed: int = 0) -> dict[str, int]:
    """case id -> fold number in [0, n_folds)."""
    if len(set(groups)) < n_folds:
        raise BreastFusionError(
            f"{len(set(groups))} patient groups cannot fill {n_folds} folds; use fewer folds or more data"
        )
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold_of: dict[str, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" on tiny cohorts
        try:
            parts = list(splitter.split(np.zeros(len(case_ids)), labels, groups))
        except ValueError as exc:
            counts = dict(sorted(Counter(labels).items()))
            raise CohortError(f"{n_folds} folds cannot be stratified with class counts {counts} ({exc}); "
                              "use fewer folds or more data") from None
        for k, (_, idx) in enumerate(parts):
            for i in idx:
                fold_of[case_ids[i]] = k
    return fold_of


def make_splits(fold_of: dict[str, int], n_folds: int = 10, test_folds: int = 2) -> list[FoldSplit]:
    splits = []
    for k in range(n_folds):
        test_set = {(k + j) % n_folds for j in range(1, test_folds + 1)}
        parts: dict[str, list[str]] = {"train": [], "test": [], "val": []}
        for cid, f in fold_of.items():
            part = "val" if f == k else "test" if f in test_set else "train"
            parts[part].append(cid)
        splits.append(FoldSplit(k, tuple(parts["train"]), tuple(parts["test"]), tuple(parts["val"])))
    return splits
