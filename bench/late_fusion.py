"""Would late fusion beat concat MM? A check on the saved predictions of a Table 3 run.

On the virtual cohort a woman's mammograms and ultrasound images come from different
people of the same class, so the two modalities are independent given the class, and
the naive-Bayes posterior of the two single-modality networks,
``p(k | MG, US) ~ p_MG(k) * p_US(k) / prior(k)``, is the best combination of their outputs
if both are calibrated. This script forms it from the single MG and single US rows'
predictions and scores it beside the rows themselves, per fold, on the **test split**
(the selection figure) and on the validation fold (reported only). Breast-level scores:
each breast's instances averaged (mean aggregation), macro one-vs-rest AUC.

    python bench/late_fusion.py runs/public/table3-virtual-cpu4

Writes bench/results/late_fusion.json and prints the means.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, command, score_splits  # noqa: E402

from breastfusion.evaluation.aggregate import PROBA_COLUMNS, aggregate  # noqa: E402
from breastfusion.evaluation.metrics import macro_auc  # noqa: E402
from breastfusion.experiment import row_dirname  # noqa: E402
from breastfusion.inference import layout  # noqa: E402
from breastfusion.provenance import git_commit, now  # noqa: E402

ROWS = ("single US", "single MG", "concat MM")


def row_dir(run: Path, row: str) -> Path:
    return run / "rows" / row_dirname(row)


def breasts(run: Path, row: str, fold: int, file: str) -> pd.DataFrame:
    table = pd.read_csv(layout.fold_dir(row_dir(run, row), fold) / file)
    return aggregate(table, "mean").set_index("case_id")


def naive_bayes(p_mg: np.ndarray, p_us: np.ndarray, prior: np.ndarray) -> np.ndarray:
    joint = p_mg * p_us / prior
    return joint / joint.sum(axis=1, keepdims=True)


def fold_scores(run: Path, fold: int, file: str) -> dict[str, float]:
    tables = {row: breasts(run, row, fold, file) for row in ROWS}
    ids = tables["single US"].index.intersection(tables["single MG"].index).intersection(tables["concat MM"].index)
    labels = tables["single US"].loc[ids, "label"].to_numpy(int)
    proba = {row: t.loc[ids, PROBA_COLUMNS].to_numpy(float) for row, t in tables.items()}
    # the prior the networks were trained under: class-weighted loss, so about uniform
    prior = np.full(len(PROBA_COLUMNS), 1 / len(PROBA_COLUMNS))
    proba["late fusion (naive Bayes)"] = naive_bayes(proba["single MG"], proba["single US"], prior)
    return {name: macro_auc(labels, p) for name, p in proba.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a Table 3 run folder with the single MG, single US and concat MM rows")
    args = ap.parse_args()
    folds = [layout.fold_number(d) for d in layout.fold_dirs(row_dir(args.run, "single US"))]
    out = {"run": str(args.run), "commit": git_commit(), "finished": now(), "command": command()}
    out["splits"] = score_splits(folds, lambda fold, file: fold_scores(args.run, fold, file))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "late_fusion.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
