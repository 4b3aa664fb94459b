"""Linear probes on cached features, shared by the bench/*_probe.py scripts.

A probe asks, before a model is built, whether some features carry a signal: a
standardised logistic regression fitted on each fold's training portion and scored on
its **test split** (never the validation fold).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from common import ROOT, append_jsonl, command, fold_means, quiet_logs
from search import DATA, row_config
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from breastfusion.evaluation.metrics import macro_auc
from breastfusion.provenance import git_commit, now
from breastfusion.records import read_manifest
from breastfusion.training.preparation import CVData, prepare

BRANCH = "mg-frozen-partialtrain"  # the search variant of the preset's MG branch (its activation cache)


def probe_arguments(doc: str, datasets: tuple[str, ...] = ("cdd-cesm", "mias"), folds: int = 10,
                    extra=None) -> argparse.Namespace:
    """A probe's command line: --data (when it can run on more than one dataset), --set
    KEY=VALUE (the branch's settings, as search.py takes them), --folds, and what `extra(parser)`
    adds; parsed, with the library's logs quietened."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    if len(datasets) > 1:
        ap.add_argument("--data", choices=datasets, default=datasets[0])
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--folds", type=int, default=folds)
    if extra is not None:
        extra(ap)
    args = ap.parse_args()
    if len(datasets) == 1:
        args.data = datasets[0]
    quiet_logs()
    return args


def branch_data(data: str, sets: list[str], variant: str = BRANCH, bilateral: bool = True):
    """The branch's config (`variant` with `sets`) and its prepared data on DATA: instances,
    folds and the cached features or activations (read from the cache the search runs filled)."""
    cfg = row_config(variant, sets)
    if bilateral and not cfg.model.bilateral:
        raise SystemExit("the probe needs the other breast: add --set model.bilateral=true")
    return cfg, prepare(read_manifest(ROOT / "runs" / "public" / DATA[data][0]), cfg, progress=False)


def designs(feats, other) -> dict[str, dict[str, np.ndarray]]:
    """case -> {"own": its features, "bilateral": [own, own - other, has other]} (zeros and a 0
    flag where the other breast is missing)."""
    out = {}
    for c, own in feats.items():
        has = other[c] is not None
        diff = own - other[c] if has else np.zeros_like(own)
        out[c] = {"own": own, "bilateral": np.concatenate([own, diff, [float(has)]])}
    return out


def breast_vectors(data: CVData, per_image: dict[str, dict[str, np.ndarray]], tag: str = ""
                   ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, int]]:
    """Per breast, from each image's named vectors (path -> {name: vector}): every name's mean
    over the breast's own views ("TAG NAME") and the bilateral design ("TAG NAME bilateral":
    that mean, its difference from the other breast's, and whether the other breast is there).
    Needs instances built with model.bilateral (the own views first, then the other's).
    Returns (case -> vectors, case -> label index)."""
    own, other, labels = {}, {}, {}
    for inst in data.instances:
        v = len(inst.mg) // 2
        mine = [per_image[r.path] for r in inst.mg[:v] if r is not None and r.path in per_image]
        theirs = [per_image[r.path] for r in inst.mg[v:] if r is not None and r.path in per_image]
        if mine:
            labels[inst.case_id] = inst.label.index
            own[inst.case_id] = {n: np.mean([f[n] for f in mine], axis=0) for n in mine[0]}
            other[inst.case_id] = {n: np.mean([f[n] for f in theirs], axis=0) for n in mine[0]} if theirs else None
    prefix = f"{tag} " if tag else ""
    vectors: dict[str, dict[str, np.ndarray]] = {c: {} for c in own}
    for name in next(iter(own.values()), {}):
        per_name = designs({c: f[name] for c, f in own.items()},
                           {c: None if o is None else o[name] for c, o in other.items()})
        for c, d in per_name.items():
            vectors[c][f"{prefix}{name}"], vectors[c][f"{prefix}{name} bilateral"] = d["own"], d["bilateral"]
    return vectors, labels


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
