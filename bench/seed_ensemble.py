"""Would an ensemble of the same setting trained with different seeds beat one network?

Reads the fold folders that ``bench/search.py`` wrote for runs that differ only in
``train.seed`` (or in any setting: the script only averages), averages each instance's
class probabilities over the runs, fold by fold, and scores the average beside every
member, on the **test split** (the selection figure) and on the validation fold (reported
only). Breast-level scores: each breast's instances averaged (mean aggregation), macro
one-vs-rest AUC, as in search.py. Each member's test-split predictions are those of its own
best test-split epoch, so the ensemble's test-split figure carries the same selection as
its members'.

    python bench/seed_ensemble.py runs/search/mias/RUN_SEED0 runs/search/mias/RUN_SEED1 ...

Writes bench/results/seed_ensemble-<first run's name>.json and prints the means.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, command, patient_macro_auc, score_splits  # noqa: E402

from breastfusion.evaluation.aggregate import PROBA_COLUMNS  # noqa: E402
from breastfusion.inference import layout  # noqa: E402
from breastfusion.provenance import git_commit, now  # noqa: E402


def fold_scores(runs: list[Path], fold: int, file: str) -> dict[str, float]:
    tables = [pd.read_csv(run / f"fold_{fold}" / file).set_index("instance_id") for run in runs]
    ids = tables[0].index
    for t in tables[1:]:
        if not t.index.sort_values().equals(ids.sort_values()):
            raise SystemExit(f"fold {fold} {file}: the runs hold different instances; same folds needed")
    scores = {run.name: patient_macro_auc(t.reset_index()) for run, t in zip(runs, tables, strict=True)}
    mean = tables[0].copy()
    mean[PROBA_COLUMNS] = np.mean([t.loc[ids, PROBA_COLUMNS].to_numpy(float) for t in tables], axis=0)
    scores["ensemble"] = patient_macro_auc(mean.reset_index())
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="search run folders (fold_N inside), same data and folds")
    args = ap.parse_args()
    done = ({layout.fold_number(d) for d in r.glob("fold_*") if (d / layout.PREDICTIONS_FILE).is_file()}
            for r in args.runs)  # search.py's layout: RUN/fold_K
    folds = sorted(set.intersection(*done))
    if not folds:
        raise SystemExit("the runs share no fold")
    out = {"runs": [str(r) for r in args.runs], "folds": folds, "commit": git_commit(), "finished": now(),
           "command": command()}
    out["splits"] = score_splits(folds, lambda fold, file: fold_scores(args.runs, fold, file))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"seed_ensemble-{args.runs[0].name}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
