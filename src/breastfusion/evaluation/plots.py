"""ROC curves, confusion matrices and reliability diagrams as PNG (patient level, validation folds
pooled)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from ..files import atomic_path  # noqa: E402
from ..vocab import CLASS_NAMES  # noqa: E402
from .aggregate import PROBA_COLUMNS  # noqa: E402
from .calibration import _confidence_correct, expected_calibration_error, reliability  # noqa: E402

COLOURS = ("#2b8cbe", "#41ab5d", "#e34a33")


def _grid(n: int, size: float = 3.6):
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def plot_roc(patients: Sequence[tuple[str, pd.DataFrame]], path: str | Path) -> Path:
    """One panel per row: one-vs-rest ROC of each class from patient mean probabilities, the
    validation folds pooled (thick, in the legend) and each fold alone (thin, faint)."""
    fig, axes = _grid(len(patients))
    for ax, (name, table) in zip(axes, patients, strict=True):
        folds = [group for _, group in table.groupby("fold")] if "fold" in table else []
        for k, cls in enumerate(CLASS_NAMES):
            for part in folds:
                _roc_line(ax, part, k, color=COLOURS[k], lw=0.6, alpha=0.3)
            _roc_line(ax, table, k, color=COLOURS[k], lw=1.8, label=cls)
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
        ax.set(title=name, xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right", fontsize=7)
    fig.suptitle("Patient-level ROC: validation folds pooled (thick) and per fold (thin)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _roc_line(ax, table: pd.DataFrame, k: int, label: str | None = None, **style) -> None:
    positive = table["label"].to_numpy() == k
    if positive.all() or not positive.any():
        return
    score = table[PROBA_COLUMNS[k]].to_numpy()
    fpr, tpr, _ = roc_curve(positive, score)
    if label is not None:
        label = f"{label} (pooled AUC {roc_auc_score(positive, score):.2f})"
    ax.plot(fpr, tpr, label=label, **style)


def plot_confusion(matrices: Sequence[tuple[str, list[list[int]]]], path: str | Path) -> Path:
    fig, axes = _grid(len(matrices), size=3.2)
    for ax, (name, cm) in zip(axes, matrices, strict=True):
        arr = np.asarray(cm, dtype=float)
        norm = arr / np.maximum(arr.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(arr.shape[0]):
            for j in range(arr.shape[1]):
                ax.text(j, i, f"{int(arr[i, j])}", ha="center", va="center",
                        color="white" if norm[i, j] > 0.5 else "black", fontsize=9)
        ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES, fontsize=8)
        ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES, fontsize=8)
        ax.set(title=name, xlabel="predicted", ylabel="true")
    fig.suptitle("Patient-level confusion (majority vote), all folds", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_reliability(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], path: str | Path, bins: int = 15) -> Path:
    """Reliability diagram PNG: accuracy against mean confidence per bin, one line per (name, probs, labels).

    The legend gives each curve's ECE; the dashed diagonal is perfect calibration; the lower
    panel is a histogram of the top-label confidences of every curve.
    """
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(4.8, 5.6), sharex=True, gridspec_kw={"height_ratios": (3, 1)}
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    edges = np.linspace(0, 1, bins + 1)
    for name, probs, labels in curves:
        table = reliability(probs, labels, bins)
        ece = expected_calibration_error(probs, labels, bins)
        conf, acc = [r["confidence"] for r in table], [r["accuracy"] for r in table]
        (line,) = top.plot(conf, acc, marker="o", label=f"{name} (ECE {ece:.1%})")
        confidence, _ = _confidence_correct(probs, labels)
        bottom.hist(confidence, bins=edges, histtype="step", color=line.get_color())
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title="reliability")
    top.legend(loc="upper left", fontsize="small")
    bottom.set(xlabel="confidence", ylabel="cases")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)
