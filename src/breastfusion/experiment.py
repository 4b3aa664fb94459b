"""An experiment: several named configurations (rows), each cross-validated on one manifest.

Run folder::

    config.yaml        every row's full RunConfig
    command.txt        the command line that made it
    breastfusion.log   every INFO line of the run (appended to when the run resumes)
    metrics.json       {"rows": [...], "statistics": {...}, "provenance": {...}}: per row the fold
                       means +- std and the pooled figures with bootstrap intervals; statistics holds
                       the paired comparisons between rows (evaluation/paired.py)
    report.md          Table 3 layout + per-row detail
    roc.png, confusion.png
    branches/          single-modality networks shared by the rows (training/branches.py)
    rows/<name>/       config.yaml (this row alone), data.json (what it was trained on), roc.png,
                       folds/fold_K/{predictions.csv, test_predictions.csv, fit.json, model.safetensors},
                       predictions_instances.csv, predictions_patients.csv
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .config import RunConfig, to_dict
from .errors import CohortError, ConfigError, WeightsError
from .evaluation.aggregate import PROBA_COLUMNS, aggregate
from .evaluation.calibration import calibrate_folds, expected_calibration_error
from .evaluation.cohort import cohort_markdown, cohort_table
from .evaluation.intervals import Bootstrap, patient_intervals
from .evaluation.paired import METHOD as COMPARISON_METHOD
from .evaluation.paired import paired_comparisons
from .evaluation.plots import plot_confusion, plot_reliability, plot_roc
from .evaluation.report import describe_row, evaluate_predictions, report_markdown
from .evaluation.subgroups import subgroup_performance
from .files import atomic_path, remove_stale_temporaries, safe_name, write_text
from .inference import layout
from .locks import RunLock
from .logs import log_to
from .provenance import git_commit, machine, now, versions
from .records import SUBGROUP_COLUMNS, Manifest, case_attributes
from .training.branches import BranchMemo
from .training.cv import cross_validate
from .training.distributed import Distributed

log = logging.getLogger(__name__)


def row_dirname(name: str) -> str:
    return safe_name(name, "row")


def training_data(manifest: Manifest, result) -> dict:
    """What a row was trained on (goes into exported bundles): no paths, no patient ids."""
    labels = {i.case_id: i.label.value for i in result.data.instances}
    return {
        "manifest_hash": manifest.content_hash(),
        "cases": len(labels),
        "instances": len(result.data.instances),
        "classes": {c: sum(v == c for v in labels.values()) for c in sorted(set(labels.values()))},
        "folds": len(result.data.splits),
    }


def row_calibration(row_dir: Path, predictions: pd.DataFrame) -> dict | None:
    """Temperature scaling per fold (fitted on the fold's test split) judged on the validation
    folds (`predictions`, all folds) at patient level: ECE before and after, reliability diagram."""
    folds = []
    for fold, val in predictions.groupby("fold", sort=True):
        test = layout.fold_dir(row_dir, fold) / layout.TEST_PREDICTIONS_FILE
        if not test.is_file():
            return None  # folds from a version that did not keep test-split logits
        folds.append((pd.read_csv(test), val))
    before, after, temps = calibrate_folds(folds)
    curves = []
    for name, table in (("uncalibrated", before), ("temperature-scaled", after)):
        curves.append((name, table[PROBA_COLUMNS].to_numpy(float), table["label"].to_numpy(int)))
    plot_reliability(curves, row_dir / "reliability.png")
    return {"temperature_mean": float(np.mean(temps)), "temperatures": temps,
            "ece_before": expected_calibration_error(curves[0][1], curves[0][2]),
            "ece_after": expected_calibration_error(curves[1][1], curves[1][2]), "level": "patient (mean p)"}


def subgroups(manifest: Manifest, patients: Sequence[tuple[str, pd.DataFrame]], bootstrap: Bootstrap) -> dict:
    """{column: {row: subgroup_performance}} for every optional manifest column (records.py,
    SUBGROUP_COLUMNS) that splits the cases into at least two values."""
    cases = manifest.cases()
    out = {}
    for column in SUBGROUP_COLUMNS:
        values = {cid: case_attributes(case, column) for cid, case in cases.items()}
        if len({v for v in values.values() if v}) < 2:
            continue
        out[column] = {name: subgroup_performance(table, values, bootstrap) for name, table in patients}
    return out


def run_experiment(manifest: Manifest, rows: Sequence[RunConfig], out_dir: str | os.PathLike,
                   title: str = "breastfusion experiment", command: str = "",
                   progress: bool = True, jobs: int = 1, bootstrap: Bootstrap | None = None) -> dict:
    """Cross-validate every row (resumable); `jobs` folds at a time (see training/execution.py).
    `bootstrap`: how the pooled figures' intervals are resampled (default 2,000, seed 0).

    Under torchrun (WORLD_SIZE > 1) every rank runs this; the folds are trained by all ranks
    together (DistributedDataParallel) and only the main rank writes files and reports.

    The main rank holds the run folder's lock (locks.RunLock) throughout: a second experiment
    into a folder that a live process is writing to raises RunLockedError before it writes
    anything there."""
    with Distributed.from_env() as dist:
        if not dist.is_main:
            if not dist.broadcast_object(None):  # the main rank could not lock the run folder
                return {"rows": [], "helper_rank": dist.rank}
            return _run_experiment(manifest, rows, out_dir, title, command, False, jobs, dist, bootstrap)
        lock = RunLock(out_dir, command)
        try:
            lock.acquire()
        except BaseException:
            dist.broadcast_object(False)  # the helper ranks stop too
            raise
        dist.broadcast_object(True)
        with lock, log_to(out_dir):  # out_dir/breastfusion.log: every INFO line of the run
            log.info("%s: %d row(s) on %s (%d images, %d cases)", command or "(python API)", len(rows),
                     manifest.source, len(manifest), len(manifest.cases()))
            return _run_experiment(manifest, rows, out_dir, title, command, progress, jobs, dist, bootstrap)


def _run_experiment(manifest: Manifest, rows: Sequence[RunConfig], out_dir: str | os.PathLike, title: str,
                    command: str, progress: bool, jobs: int, dist: Distributed,
                    bootstrap: Bootstrap | None = None) -> dict:
    bootstrap = bootstrap or Bootstrap()
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ConfigError(f"row names must be unique: {names}")
    for row in rows:
        row.validate()
    out = Path(out_dir)
    if not dist.is_main:  # a helper rank: it trains every fold with the others, and writes nothing
        memo = BranchMemo(out / "branches")
        for row in rows:
            try:
                cross_validate(manifest, row, out / "rows" / row_dirname(row.name), progress=False, memo=memo,
                               dist=dist)
            except (WeightsError, CohortError):
                continue  # the main rank reports the row as not run
        return {"rows": [], "helper_rank": dist.rank}  # the main rank's metrics.json has the results
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # left by a process killed mid-write (live writers' are kept)
    write_text(out / "config.yaml", yaml.safe_dump({"rows": [to_dict(r) for r in rows]}, sort_keys=False))
    write_text(out / "command.txt", command + "\n")
    started = time.time()
    memo = BranchMemo(out / "branches")
    results, patients = [], []
    for row in rows:
        t0 = time.time()
        row_dir = out / "rows" / row_dirname(row.name)
        log.info("[%s] cross-validating (%d folds, %s mode)", row.name, row.cv.folds, row.train.mode)
        try:
            result = cross_validate(manifest, row, row_dir, progress=progress, memo=memo, jobs=jobs, dist=dist)
        except (WeightsError, CohortError) as exc:
            # GoogLeNet without ImageNet weights (a frozen random backbone says nothing),
            # or a row the data cannot feed (MLO-less rows on MLO-only mini-MIAS): the
            # row is reported as not run, with the reason, and the others go on.
            entry = describe_row(row)
            entry["not_run"] = str(exc)
            results.append(entry)
            log.warning("[%s] not run: %s", row.name, exc)
            continue
        instances = result.predictions
        patient_means, patient_votes = aggregate(instances, "mean"), aggregate(instances, "vote")
        for name, table in (("predictions_instances.csv", instances), ("predictions_patients.csv", patient_votes)):
            with atomic_path(row_dir / name) as tmp:
                table.to_csv(tmp, index=False)
        write_text(row_dir / layout.CONFIG_FILE, yaml.safe_dump(to_dict(row), sort_keys=False))
        write_text(row_dir / "data.json", json.dumps(training_data(manifest, result), indent=1))
        plot_roc([(row.name, patient_means)], row_dir / "roc.png")
        calibration = row_calibration(row_dir, instances)
        entry = describe_row(row)
        entry.update(evaluate_predictions(instances, patient_votes, patient_means))
        entry["patient"]["pooled"] = patient_intervals(patient_votes, bootstrap)
        entry["patient_mean"]["pooled"] = patient_intervals(patient_means, bootstrap)
        entry["excluded"] = dict(result.data.skipped)
        entry["refused_images"] = len(result.data.failed)
        entry["preprocessing_notes"] = result.data.note_counts()
        entry["seconds"] = round(time.time() - t0, 1)
        rel = row_dir.relative_to(out).as_posix()
        entry["files"] = {"config": f"{rel}/config.yaml", "roc": f"{rel}/roc.png",
                          "predictions": f"{rel}/predictions_instances.csv"}
        if calibration is not None:
            entry["calibration"] = calibration
            entry["files"]["reliability"] = f"{rel}/reliability.png"
        results.append(entry)
        patients.append((row.name, patient_means))
        auc = entry["patient"]["auc"]
        log.info("[%s] patient AUC %s (%s s)", row.name, ", ".join(f"{c} {auc[c]['mean']:.3f}" for c in auc),
                 entry["seconds"])
    provenance = {
        "command": command or "(python API)",
        "manifest": f"{manifest.source} ({len(manifest)} images, {len(manifest.cases())} cases, "
                    f"hash {manifest.content_hash()}, classes {manifest.class_counts()})",
        "git commit": git_commit(),
        "versions": ", ".join(f"{k} {v}" for k, v in versions().items()),
        "machine": machine(),
        "finished": now(),
        "wall time": f"{time.time() - started:.0f} s",
    }
    statistics = {"bootstrap": bootstrap.to_dict(), "comparison_method": COMPARISON_METHOD,
                  "comparisons": paired_comparisons(results, dict(patients), bootstrap.confidence),
                  "subgroups": subgroups(manifest, patients, bootstrap)}
    cohort = cohort_table(manifest)
    metrics = {"rows": results, "statistics": statistics, "cohort": cohort, "provenance": provenance}
    write_text(out / "metrics.json", json.dumps(metrics, indent=1, allow_nan=True))
    write_text(out / "report.md", report_markdown(title, results, provenance, statistics, cohort_markdown(cohort)))
    if patients:  # every row may have been "not run"
        plot_roc(patients, out / "roc.png")
        plot_confusion([(r["name"], r["patient"]["confusion"]) for r in results if "patient" in r],
                       out / "confusion.png")
    return metrics
