"""Linear probes on cached features, shared by the bench/*_probe.py scripts.

A probe asks, before a model is built, whether some features carry a signal: a
standardised logistic regression fitted on each fold's training portion and scored on
its **test split** (never the validation fold).
"""

from __future__ import annotations

import json

import numpy as np
from common import append_jsonl, command, fold_means
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from breastfusion.evaluation.metrics import macro_auc
from breastfusion.provenance import git_commit, now


def standardised_logistic(c: float, balanced: bool = False) -> Pipeline:
    """Standardise, then a (multinomial) logistic regression with inverse L2 strength c."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000,
                                                              class_weight="balanced" if balanced else None))


def probe_folds(splits, vectors: dict[str, dict[str, np.ndarray]], labels: dict[str, int],
                c_values) -> list[dict]:
    """Per fold: for every design (the keys of each case's vectors) and every c, a regression on
    the training portion's cases scored by macro AUC on the test split's; one dict per fold,
    {"fold": k, "DESIGN C=c": auc, ...}, each printed as it is done."""
    folds = []
    for split in splits:
        train = [c for c in split.train if c in vectors]
        test = [c for c in split.test if c in vectors]
        y_train = np.array([labels[c] for c in train])
        y_test = np.array([labels[c] for c in test])
        fold = {"fold": split.fold}
        for design in vectors[train[0]]:
            x_train = np.stack([vectors[c][design] for c in train])
            x_test = np.stack([vectors[c][design] for c in test])
            for c_reg in c_values:
                clf = standardised_logistic(c_reg).fit(x_train, y_train)
                fold[f"{design} C={c_reg}"] = macro_auc(y_test, clf.predict_proba(x_test))
        print(json.dumps(fold), flush=True)
        folds.append(fold)
    return folds


def record_probe(name: str, folds: list[dict], **fields) -> dict:
    """Each figure's mean over the folds printed, and the whole result (with `fields`, the
    command and the commit) appended to bench/results/NAME.jsonl."""
    result = {**fields, "command": command(), "commit": git_commit(), "finished": now(), "folds": folds,
              "mean": fold_means(folds)}
    for k, v in result["mean"].items():
        print(f"{k}: test-split macro AUC {100 * v:.1f}")
    append_jsonl(name, result)
    return result


def run_probe(name: str, splits, vectors: dict[str, dict[str, np.ndarray]], labels: dict[str, int], c_values,
              **fields) -> dict:
    """`probe_folds`, recorded by `record_probe`."""
    return record_probe(name, probe_folds(splits, vectors, labels, c_values), **fields)
