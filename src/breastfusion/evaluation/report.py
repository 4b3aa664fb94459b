"""From prediction tables to metrics.json rows and a report.md in the layout of the paper's Table 3."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..vocab import CLASS_NAMES
from .aggregate import PROBA_COLUMNS, aggregate
from .metrics import classification_metrics, summarize_folds


def fold_metrics(table: pd.DataFrame) -> list[dict]:
    """Per-fold metrics of a table with fold, label, p_* and optionally pred columns."""
    out = []
    for _, group in table.groupby("fold", sort=True):
        proba = group[PROBA_COLUMNS].to_numpy(dtype=float)
        pred = group["pred"].to_numpy() if "pred" in group else proba.argmax(axis=1)
        out.append(classification_metrics(group["label"].to_numpy(), pred, proba))
    return out


def evaluate_predictions(instances: pd.DataFrame, by_vote: pd.DataFrame | None = None,
                         by_mean: pd.DataFrame | None = None) -> dict:
    """Instance level, patient level by vote, patient level by mean probability (patient
    tables are aggregated here unless the caller already has them)."""
    by_vote = aggregate(instances, "vote") if by_vote is None else by_vote
    by_mean = aggregate(instances, "mean") if by_mean is None else by_mean
    return {
        "instance": summarize_folds(fold_metrics(instances)),
        "patient": summarize_folds(fold_metrics(by_vote)),
        "patient_mean": summarize_folds(fold_metrics(by_mean)),
    }


def describe_row(cfg) -> dict:
    """What a row of Table 3 is, from its RunConfig."""
    m, t = cfg.model, cfg.train
    return {
        "name": cfg.name,
        "modalities": list(m.modalities),
        "fusion": m.fusion if m.multimodal else None,
        "arcface": m.arcface,
        "mg_slots": list(m.mg_slots) if "MG" in m.modalities else [],
        "backbone": m.backbone.name,
        "weights": m.backbone.weights,
        "mode": t.mode,
        "folds": cfg.cv.folds,
    }


def _pm(stat: dict, scale: float = 100.0) -> str:
    if stat is None or stat.get("n", 0) == 0 or math.isnan(stat["mean"]):
        return "n/a"
    return f"{scale * stat['mean']:.1f} ± {scale * stat['std']:.1f}"


def _views(row: dict) -> str:
    if not row["mg_slots"]:
        return "-"
    return ", ".join(row["mg_slots"])


def table3_markdown(rows: Sequence[dict]) -> str:
    head = ("| model | backbone (weights), mode | MG views | ArcFace | AUC normal | AUC benign "
            "| AUC malignant | macro AUC | accuracy (vote) | accuracy (mean p) |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        first = (f"| {r['name']} | {r['backbone']} ({r['weights']}), {r['mode']} | {_views(r)} | "
                 f"{'yes' if r['arcface'] else 'no'} | ")
        if "not_run" in r:
            lines.append(first + "not run (see below) |" + " |" * 5)
            continue
        p, pm = r["patient"], r["patient_mean"]
        lines.append(
            first
            + " | ".join(_pm(p["auc"][c]) for c in CLASS_NAMES)
            + f" | {_pm(p['macro_auc'])} | {_pm(p['accuracy'])} | {_pm(pm['accuracy'])} |"
        )
    return "\n".join(lines)


def _confusion_markdown(cm: list[list[int]]) -> str:
    lines = ["| true \\ predicted | " + " | ".join(CLASS_NAMES) + " | recall |", "|" + "---|" * 5]
    arr = np.asarray(cm)
    for i, name in enumerate(CLASS_NAMES):
        total = arr[i].sum()
        recall = f"{100 * arr[i, i] / total:.1f}%" if total else "n/a"
        lines.append(f"| {name} | " + " | ".join(str(v) for v in arr[i]) + f" | {recall} |")
    col = arr.sum(axis=0)
    prec = [f"{100 * arr[j, j] / col[j]:.1f}%" if col[j] else "n/a" for j in range(len(CLASS_NAMES))]
    acc = arr.trace() / arr.sum() if arr.sum() else float("nan")
    lines.append("| precision | " + " | ".join(prec) + f" | accuracy {100 * acc:.1f}% |")
    return "\n".join(lines)


def report_markdown(title: str, rows: Sequence[dict], provenance: dict) -> str:
    parts = [f"# {title}", ""]
    parts += [f"- **{k}**: {v}" for k, v in provenance.items()]
    parts += [
        "",
        "## Patient-level AUC (%), mean ± std over validation folds (Table 3 layout)",
        "",
        "Patient score = mean of the instances' softmax probabilities; class decision = majority "
        "vote (ties: mean probability) or the class of the mean probability.",
        "",
        table3_markdown(rows),
        "",
    ]
    for r in rows:
        parts += [
            f"## {r['name']}",
            "",
            f"modalities {', '.join(r['modalities'])}; fusion {r['fusion'] or '-'}; ArcFace "
            f"{'yes' if r['arcface'] else 'no'}; backbone {r['backbone']} ({r['weights']}); "
            f"mode {r['mode']}; {r['folds']} folds."
            + (f" Config `{r['files']['config']}`, ROC `{r['files']['roc']}`, predictions "
               f"`{r['files']['predictions']}`." if "files" in r else ""),
            "",
        ]
        if "not_run" in r:
            parts += [f"**Not run**: {r['not_run']}", ""]
            continue
        parts += [
            "| level | " + " | ".join(f"AUC {c}" for c in CLASS_NAMES) + " | "
            + " | ".join(f"recall {c}" for c in CLASS_NAMES) + " | accuracy |",
            "|" + "---|" * 8,
        ]
        for level, key in (("instance", "instance"), ("patient (vote)", "patient"),
                           ("patient (mean p)", "patient_mean")):
            m = r[key]
            parts.append(f"| {level} | " + " | ".join(_pm(m["auc"][c]) for c in CLASS_NAMES) + " | "
                         + " | ".join(_pm(m["recall"][c]) for c in CLASS_NAMES)
                         + f" | {_pm(m['accuracy'])} |")
        parts += ["", "Patient-level confusion (vote), all validation folds:", "",
                  _confusion_markdown(r["patient"]["confusion"]), ""]
        if "calibration" in r:
            c = r["calibration"]
            parts += [f"Calibration (patient level, validation folds): ECE {100 * c['ece_before']:.1f}% before, "
                      f"{100 * c['ece_after']:.1f}% after temperature scaling (mean T {c['temperature_mean']:.2f}, "
                      f"fitted per fold on its test split); reliability diagram `{r['files']['reliability']}`.", ""]
    return "\n".join(parts)
