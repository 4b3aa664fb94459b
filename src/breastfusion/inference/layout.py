"""The run folder's layout: where a cross-validated row keeps each fold's files.

    ROW/config.yaml                     the row's RunConfig
    ROW/folds/fold_K/model.safetensors  fold K's trained network
    ROW/folds/fold_K/fit.json           its training history and chosen epoch
    ROW/folds/fold_K/test_predictions.csv   its test split (calibration, operating points)
    ROW/folds/fold_K/predictions.csv    its validation fold; written last: marks the fold done

Training writes this layout; export, explanation and reports read it, all through these names.
"""

from __future__ import annotations

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


def fold_done(row_dir: str | os.PathLike, fold: int) -> bool:
    return (fold_dir(row_dir, fold) / PREDICTIONS_FILE).is_file()


def fold_dirs(row_dir: str | os.PathLike) -> list[Path]:
    """The completed folds of a row (those with weights and predictions), in fold order."""
    folds = Path(row_dir) / "folds"
    done = [d for d in folds.glob("fold_*") if (d / MODEL_FILE).is_file() and (d / PREDICTIONS_FILE).is_file()]
    return sorted(done, key=lambda d: int(d.name.split("_")[1]))
