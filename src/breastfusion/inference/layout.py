"""The run folder's layout: where a cross-validated row keeps each fold's files.

    ROW/config.yaml                     the row's RunConfig
    ROW/folds/fold_K/model.safetensors  fold K's trained network
    ROW/folds/fold_K/fit.json           its training history and chosen epoch
    ROW/folds/fold_K/test_predictions.csv   its test split (calibration, operating points)
    ROW/folds/fold_K/predictions.csv    its validation fold; written last: marks the fold done

Training writes this layout; export, explanation and reports read it, all through these names.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.safetensors"
FIT_FILE = "fit.json"
TEST_PREDICTIONS_FILE = "test_predictions.csv"
PREDICTIONS_FILE = "predictions.csv"
LOG_FILE = "breastfusion.log"


def fold_dir(row_dir: str | os.PathLike, fold: int) -> Path:
    return Path(row_dir) / "folds" / f"fold_{fold}"


def fold_number(folder: str | os.PathLike) -> int:
    """K of a ``fold_K`` folder."""
    name = Path(folder).name
    prefix, _, number = name.partition("_")
    if prefix != "fold" or not number.isdigit():
        raise ValueError(f"{folder}: not a fold folder (fold_K)")
    return int(number)


def fold_done(row_dir: str | os.PathLike, fold: int) -> bool:
    return (fold_dir(row_dir, fold) / PREDICTIONS_FILE).is_file()


def fold_dirs(row_dir: str | os.PathLike) -> list[Path]:
    """The completed folds of a row (those with weights and predictions), in fold order."""
    folds = Path(row_dir) / "folds"
    done = [d for d in folds.glob("fold_*") if (d / MODEL_FILE).is_file() and (d / PREDICTIONS_FILE).is_file()]
    return sorted(done, key=fold_number)


def recorded_splits(row_dir: str | os.PathLike) -> dict[int, dict[str, set[str]]]:
    """fold -> its case ids per split ("train", "test", "val"), as the completed folds' files
    record them: validation = predictions.csv, test = test_predictions.csv, train = the row's
    other cases (every case is validated in exactly one fold; with folds missing, train is
    then a subset of the true one, never larger)."""
    def cases(file: Path) -> set[str]:
        with open(file, newline="", encoding="utf-8") as fh:
            return {row["case_id"] for row in csv.DictReader(fh)}

    parts = {fold_number(d): {"val": cases(d / PREDICTIONS_FILE), "test": cases(d / TEST_PREDICTIONS_FILE)}
             for d in fold_dirs(row_dir)}
    known = set().union(*(p["val"] | p["test"] for p in parts.values()))
    for p in parts.values():
        p["train"] = known - p["val"] - p["test"]
    return parts
