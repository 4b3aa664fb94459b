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
        # each branch's backbone as used (per-modality backbones may differ from `backbone`)
        "backbones": {mod.value: {"name": bb.name, "image_size": bb.image_size, "frozen": bb.frozen,
                                  "pooling": bb.pooling} for mod, bb in m.backbones().items()},
        "weights": m.backbone.weights,
        "mode": t.mode,
        "folds": cfg.cv.folds,
        # the remaining design choices, for pairing ablations with their reference (paired.py)
        "head": m.head,
        "attention_heads": m.attention_heads,
        "l2_normalize": m.l2_normalize,
    }


def _pm(stat: dict, scale: float = 100.0) -> str:
    if stat is None or stat.get("n", 0) == 0 or math.isnan(stat["mean"]):
        return "n/a"
    return f"{scale * stat['mean']:.1f} ± {scale * stat['std']:.1f}"


def _ci(stat: dict | None, scale: float = 100.0) -> str:
    """A pooled value with its interval: 91.2 [88.0, 94.1]."""
    if stat is None or math.isnan(stat["value"]):
        return "n/a"
    return f"{scale * stat['value']:.1f} [{scale * stat['low']:.1f}, {scale * stat['high']:.1f}]"


def _p(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _backbone(row: dict, detail: bool = False) -> str:
    """The backbone column: the backbone's name, or each branch's where they differ (runs since
    2026-12-01 record them); `detail` adds each branch's input size, frozen stage and pooling."""
    branches = row.get("backbones") or {}
    if detail and branches:
        return "; ".join(f"{m} {b['name']} {b['image_size']} px, frozen {b['frozen']}, {b['pooling']} pooling"
                         for m, b in branches.items())
    if {b["name"] for b in branches.values()} <= {row["backbone"]}:
        return row["backbone"]
    return "; ".join(f"{m} {b['name']}" for m, b in branches.items())


def _views(row: dict) -> str:
    if not row["mg_slots"]:
        return "-"
    return ", ".join(row["mg_slots"])


def table3_markdown(rows: Sequence[dict]) -> str:
    head = ("| model | backbone (weights), mode | MG views | ArcFace | AUC normal | AUC benign "
            "| AUC malignant | macro AUC | accuracy (vote) | accuracy (mean p) |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        first = (f"| {r['name']} | {_backbone(r)} ({r['weights']}), {r['mode']} | {_views(r)} | "
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


def side_by_side_markdown(runs: dict[str, Sequence[dict]]) -> str:
    """Runs of the same rows (e.g. two presets), row by row: each run's patient-level AUCs
    (mean ± std over folds) and its macro AUC's difference from the first run's. `runs`: label ->
    the "rows" of that run's metrics.json, in the order they are to be listed."""
    labels = list(runs)
    by_run = {label: {r["name"]: r for r in rows} for label, rows in runs.items()}
    names = list(dict.fromkeys(r["name"] for rows in runs.values() for r in rows))
    lines = [f"| model | run | backbone, mode | AUC normal | AUC benign | AUC malignant | macro AUC "
             f"| macro vs {labels[0]} | accuracy (vote) |", "|" + "---|" * 9]
    for name in names:
        first = by_run[labels[0]].get(name)
        for label in labels:
            r = by_run[label].get(name)
            if r is None or "not_run" in r:
                lines.append(f"| {name} | {label} | {_backbone(r, True) + ', ' + r['mode'] if r else ''} | "
                             + ("not run" if r else "not in this run") + " |" + " |" * 5)
                continue
            p = r["patient"]
            delta = ""
            if label != labels[0] and first is not None and "not_run" not in first:
                delta = f"{100 * (p['macro_auc']['mean'] - first['patient']['macro_auc']['mean']):+.1f}"
            lines.append(f"| {name} | {label} | {_backbone(r, True)}, {r['mode']} | "
                         + " | ".join(_pm(p["auc"][c]) for c in CLASS_NAMES)
                         + f" | {_pm(p['macro_auc'])} | {delta} | {_pm(p['accuracy'])} |")
    return "\n".join(lines)


def pooled_markdown(rows: Sequence[dict]) -> str:
    """Pooled out-of-fold figures with their bootstrap intervals, one line per row that ran."""
    lines = ["| model | patients | AUC normal | AUC benign | AUC malignant | macro AUC | accuracy (vote) |",
             "|" + "---|" * 7]
    for r in rows:
        pooled = r.get("patient", {}).get("pooled")
        if pooled is None:
            continue
        lines.append(f"| {r['name']} | {pooled['n']} | " + " | ".join(_ci(pooled["auc"][c]) for c in CLASS_NAMES)
                     + f" | {_ci(pooled['macro_auc'])} | {_ci(pooled['accuracy'])} |")
    return "\n".join(lines)


def comparisons_markdown(comparisons: Sequence[dict]) -> str:
    """Paired AUC differences (row a minus row b, points) with interval, p and Holm-adjusted p."""
    lines = ["| a | b | why | patients | " + " | ".join(f"ΔAUC {c} [95% CI], p (Holm)" for c in CLASS_NAMES) + " |",
             "|" + "---|" * 7]
    for comp in comparisons:
        cells = []
        for c in CLASS_NAMES:
            d = comp[c]
            if math.isnan(d["difference"]):
                cells.append("n/a")
                continue
            cells.append(f"{100 * d['difference']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}], "
                         f"p {_p(d['p'])} ({_p(d['p_holm'])})")
        lines.append(f"| {comp['a']} | {comp['b']} | {comp['why']} | {comp['n']} | " + " | ".join(cells) + " |")
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


def report_markdown(title: str, rows: Sequence[dict], provenance: dict, statistics: dict | None = None,
                    cohort: str = "") -> str:
    """`statistics`: {"bootstrap": ..., "comparisons": [...], "subgroups": ...} as in metrics.json;
    `cohort`: the cohort table (markdown) printed first."""
    parts = [f"# {title}", ""]
    parts += [f"- **{k}**: {v}" for k, v in provenance.items()]
    if cohort:
        parts += ["", "## Cohort", "", cohort]
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
    if statistics:
        parts += _statistics_markdown(statistics, rows)
    for r in rows:
        parts += [
            f"## {r['name']}",
            "",
            f"modalities {', '.join(r['modalities'])}; fusion {r['fusion'] or '-'}; ArcFace "
            f"{'yes' if r['arcface'] else 'no'}; backbone {_backbone(r, True)} ({r['weights']}); "
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
        if "pooled" in r["patient"]:
            pooled = r["patient"]["pooled"]
            parts += ["", f"Pooled over the validation folds ({pooled['n']} patients, each predicted once), "
                      "95% intervals by stratified bootstrap, decision by vote:", "",
                      "| class | AUC | sensitivity | specificity |", "|---|---|---|---|"]
            parts += [f"| {c} | {_ci(pooled['auc'][c])} | {_ci(pooled['sensitivity'][c])} | "
                      f"{_ci(pooled['specificity'][c])} |" for c in CLASS_NAMES]
            parts.append(f"| all | macro {_ci(pooled['macro_auc'])} | accuracy {_ci(pooled['accuracy'])} | |")
        if r.get("preprocessing_notes") or r.get("refused_images"):
            notes = "; ".join(f"{reason}: {n} image(s)" for reason, n in r.get("preprocessing_notes", {}).items())
            parts += ["", "Preprocessing: " + "; ".join(filter(None, [
                notes, f"{r['refused_images']} image(s) refused (refused_images.json)" if r.get("refused_images")
                else ""])) + "."]
        parts += ["", "Patient-level confusion (vote), all validation folds:", "",
                  _confusion_markdown(r["patient"]["confusion"]), ""]
        if "calibration" in r:
            c = r["calibration"]
            parts += [f"Calibration (patient level, validation folds): ECE {100 * c['ece_before']:.1f}% before, "
                      f"{100 * c['ece_after']:.1f}% after temperature scaling (mean T {c['temperature_mean']:.2f}, "
                      f"fitted per fold on its test split); reliability diagram `{r['files']['reliability']}`.", ""]
    return "\n".join(parts)


def _statistics_markdown(statistics: dict, rows: Sequence[dict]) -> list[str]:
    boot = statistics["bootstrap"]
    parts = [
        f"## Pooled out-of-fold figures (%) with {100 * boot['confidence']:.0f}% intervals", "",
        f"Every patient is predicted once across the validation folds; the folds' predictions pooled "
        f"give one figure per row, its interval by {boot['method']} ({boot['resamples']} resamples, "
        f"seed {boot['seed']}).", "", pooled_markdown(rows), "",
    ]
    comparisons = statistics.get("comparisons") or []
    if comparisons:
        parts += [
            "## Paired comparisons (same patients)", "",
            f"AUC of row a minus AUC of row b in points, per class, with {statistics['comparison_method']}; "
            "in brackets the p-value Holm-adjusted over every comparison of this table. A difference is "
            "supported by these patients when its adjusted p is below 0.05; where the interval holds 0 "
            "the data cannot tell the two rows apart.", "", comparisons_markdown(comparisons), "",
        ]
    for column, table in (statistics.get("subgroups") or {}).items():
        parts += [f"## Subgroups by {column}", "", subgroup_markdown(table), ""]
    return parts


def subgroup_markdown(table: dict) -> str:
    """Per-row, per-subgroup AUC with interval; a class with too few patients says so."""
    lines = ["| model | subgroup | patients | " + " | ".join(f"AUC {c}" for c in CLASS_NAMES) + " |",
             "|" + "---|" * 6]
    for row, groups in table.items():
        for value, g in groups.items():
            cells = [(_ci(g["auc"][c]) if isinstance(g["auc"][c], dict) else g["auc"][c]) for c in CLASS_NAMES]
            n = "<5" if 0 < g["n"] < 5 else g["n"]
            lines.append(f"| {row} | {value} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
