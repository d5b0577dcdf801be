"""Classification metrics with `all` (label 1) as the positive class, computed in numpy."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, int]:
    """tp, fp, tn, fn with label 1 (all) positive."""
    y_true = np.asarray(y_true).astype(int)
    y_pred = np.asarray(y_pred).astype(int)
    return {
        "tp": int(np.sum((y_true == 1) & (y_pred == 1))),
        "fp": int(np.sum((y_true == 0) & (y_pred == 1))),
        "tn": int(np.sum((y_true == 0) & (y_pred == 0))),
        "fn": int(np.sum((y_true == 1) & (y_pred == 0))),
    }


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def sensitivity(cm: dict[str, int]) -> float | None:
    """Recall of class `all`: TP / (TP + FN)."""
    return _ratio(cm["tp"], cm["tp"] + cm["fn"])


def specificity(cm: dict[str, int]) -> float | None:
    """Recall of class `hem`: TN / (TN + FP)."""
    return _ratio(cm["tn"], cm["tn"] + cm["fp"])


def weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The challenge's metric: per-class F1 averaged with weights = class support."""
    y_true = np.asarray(y_true).astype(int)
    y_pred = np.asarray(y_pred).astype(int)
    total = len(y_true)
    if total == 0:
        return 0.0
    score = 0.0
    for cls in (0, 1):
        tp = np.sum((y_true == cls) & (y_pred == cls))
        fp = np.sum((y_true != cls) & (y_pred == cls))
        fn = np.sum((y_true == cls) & (y_pred != cls))
        denom = 2 * tp + fp + fn
        f1 = (2 * tp / denom) if denom else 0.0
        score += f1 * np.sum(y_true == cls) / total
    return float(score)


def roc_auc(y_true: np.ndarray, p: np.ndarray) -> float | None:
    """Area under the ROC curve for p(all) (Mann-Whitney, ties counted half); None with one class."""
    y_true = np.asarray(y_true).astype(int)
    p = np.asarray(p, dtype=np.float64)
    n_pos = int(np.sum(y_true == 1))
    n_neg = len(y_true) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(len(p), dtype=np.float64)
    sorted_p = p[order]
    # Average ranks over ties.
    i = 0
    while i < len(p):
        j = i
        while j + 1 < len(p) and sorted_p[j + 1] == sorted_p[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y_true == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def choose_threshold(y_true: np.ndarray, p: np.ndarray, max_candidates: int = 512) -> float:
    """The threshold on p(all) that maximises weighted F1 (ties: closest to 0.5)."""
    p = np.asarray(p, dtype=np.float64)
    candidates = np.unique(p)
    if len(candidates) > max_candidates:
        candidates = np.quantile(p, np.linspace(0, 1, max_candidates))
    # A cell is called `all` when p >= threshold; midpoints avoid sitting exactly on a sample.
    candidates = np.unique(np.concatenate([[0.5], candidates]))
    best, best_score = 0.5, -1.0
    for t in candidates:
        score = weighted_f1(y_true, p >= t)
        if score > best_score + 1e-12 or (abs(score - best_score) <= 1e-12 and abs(t - 0.5) < abs(best - 0.5)):
            best, best_score = float(t), score
    return best


def per_subject_accuracy(subjects: Sequence[str | None], y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy of the cell calls within each subject."""
    hits: dict[str, list[int]] = defaultdict(list)
    for subject, t, q in zip(subjects, np.asarray(y_true), np.asarray(y_pred), strict=True):
        hits[str(subject)].append(int(int(t) == int(q)))
    return {s: float(np.mean(v)) for s, v in sorted(hits.items())}


def summarize(
    y_true: np.ndarray, p: np.ndarray, threshold: float, subjects: Sequence[str | None] | None = None
) -> dict[str, object]:
    """Every figure the manifest and `allscore evaluate` report, at a given threshold."""
    y_true = np.asarray(y_true).astype(int)
    y_pred = (np.asarray(p) >= threshold).astype(int)
    cm = confusion(y_true, y_pred)
    subjects = list(subjects) if subjects is not None else [None] * len(y_true)
    per_subject = per_subject_accuracy(subjects, y_true, y_pred)
    known = {s: a for s, a in per_subject.items() if s != "None"}
    return {
        "weighted_f1": weighted_f1(y_true, y_pred),
        "auc": roc_auc(y_true, p),
        "sensitivity": sensitivity(cm),
        "specificity": specificity(cm),
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else 0.0,
        "threshold": float(threshold),
        "confusion": cm,
        "per_subject_accuracy": per_subject,
        "mean_subject_accuracy": float(np.mean(list(known.values()))) if known else None,
        "n_cells": len(y_true),
        "n_subjects": len(known),
    }
