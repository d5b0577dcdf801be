"""The training report's pictures (matplotlib, PNG): what a reader of a model version wants to see.

- roc.png: the ROC curve on the validation subjects, with the chosen threshold's operating point;
- confusion.png: the confusion matrix at that threshold (positive class `all`);
- learning_curves.png: training and validation loss (and AUC) per epoch, the best epoch marked;
- per_subject.png: accuracy per validation subject.

They are published beside model.keras and listed in the manifest's report_pictures.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PICTURES = ("roc.png", "confusion.png", "learning_curves.png", "per_subject.png")
ALL_RED = "#c62828"
HEM_GREEN = "#2e7d32"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def roc_points(labels: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-p, kind="stable")
    y, s = labels[order].astype(bool), p[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # the end of each run of equal scores
    n_pos, n_neg = max(1, int(y.sum())), max(1, int((~y).sum()))
    return np.r_[0.0, fp[last] / n_neg], np.r_[0.0, tp[last] / n_pos]


def roc_png(labels: np.ndarray, p: np.ndarray, threshold: float, auc: float | None) -> bytes:
    """The ROC curve with the operating point of `threshold`."""
    plt = _pyplot()
    fpr, tpr = roc_points(labels, p)
    called = p >= threshold
    y = labels.astype(bool)
    point = (float(np.mean(called[~y])) if (~y).any() else 0.0, float(np.mean(called[y])) if y.any() else 0.0)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot(fpr, tpr, color="#1f3347", lw=2, label=f"ROC (AUC {auc:.3f})" if auc is not None else "ROC")
    ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--", label="chance")
    ax.plot(*point, "o", color=ALL_RED, ms=8, label=f"threshold {threshold:.3f}")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity, ALL)")
    ax.set_title("ROC on the validation subjects")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def confusion_png(confusion: Mapping[str, int], threshold: float) -> bytes:
    """The 2x2 confusion matrix (rows: truth, columns: the model's call)."""
    plt = _pyplot()
    grid = np.array(
        [[confusion.get("tp", 0), confusion.get("fn", 0)], [confusion.get("fp", 0), confusion.get("tn", 0)]]
    )
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(grid, cmap="Blues")
    for (i, j), n in np.ndenumerate(grid):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=14, color="white" if n > grid.max() / 2 else "black")
    ax.set_xticks([0, 1], ["called ALL", "called hem"])
    ax.set_yticks([0, 1], ["truly ALL", "truly hem"])
    ax.set_title(f"Confusion matrix at threshold {threshold:.3f}")
    return _png(fig)


def learning_curves_png(history: Mapping[str, Sequence[float]], best_epoch: int | None) -> bytes:
    """Loss per epoch (training and validation), AUC on a second axis when recorded."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for key, colour, label in (("loss", "#1f3347", "training loss"), ("val_loss", "#e07b00", "validation loss")):
        if history.get(key):
            ax.plot(range(1, len(history[key]) + 1), history[key], color=colour, lw=2, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("binary cross-entropy")
    if best_epoch:
        ax.axvline(best_epoch, color="#777", ls=":", lw=1, label=f"kept epoch ({best_epoch}, best validation AUC)")
    lines, labels = ax.get_legend_handles_labels()
    if history.get("val_auc"):
        ax2 = ax.twinx()
        ax2.plot(range(1, len(history["val_auc"]) + 1), history["val_auc"], color=HEM_GREEN, lw=1, ls="--")
        ax2.set_ylabel("validation AUC", color=HEM_GREEN)
        ax2.set_ylim(0, 1.02)
        lines.append(ax2.get_lines()[0])
        labels.append("validation AUC")
    ax.legend(lines, labels, fontsize=8, loc="center right")
    ax.set_title("Learning curves")
    return _png(fig)


def per_subject_png(per_subject: Mapping[str, float], subject_labels: Mapping[str, int] | None = None) -> bytes:
    """Accuracy per validation subject, one bar each (red: an ALL subject, green: a healthy one)."""
    plt = _pyplot()
    subjects = list(per_subject)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(subjects) + 1.5), 3.6))
    colours = [ALL_RED if (subject_labels or {}).get(s, 1) else HEM_GREEN for s in subjects]
    ax.bar(range(len(subjects)), [per_subject[s] for s in subjects], color=colours)
    ax.set_xticks(range(len(subjects)), subjects, rotation=60 if len(subjects) > 8 else 0, fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy per validation subject (red: ALL, green: healthy)")
    return _png(fig)


def training_report(
    *,
    labels: np.ndarray,
    p: np.ndarray,
    threshold: float,
    metrics: Mapping[str, Any],
    history: Mapping[str, Sequence[float]],
    subjects: Sequence[str | None],
    best_epoch: int | None,
) -> dict[str, bytes]:
    """Every picture of the training report, file name -> PNG bytes."""
    subject_labels: dict[str, int] = {}
    for subject, label in zip(subjects, labels, strict=True):
        if subject is not None:
            subject_labels[subject] = max(subject_labels.get(subject, 0), int(label))
    return {
        "roc.png": roc_png(labels, p, threshold, metrics.get("auc")),
        "confusion.png": confusion_png(metrics.get("confusion", {}), threshold),
        "learning_curves.png": learning_curves_png(history, best_epoch),
        "per_subject.png": per_subject_png(metrics.get("per_subject_accuracy", {}), subject_labels),
    }
