"""Metrics with `all` (label 1) as the positive class: the test that would have caught the write-up's mistake."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.metrics import (
    choose_threshold,
    confusion,
    roc_auc,
    sensitivity,
    specificity,
    summarize,
    weighted_f1,
)


def test_sensitivity_is_the_recall_of_all_not_of_hem() -> None:
    # 10 ALL cells all found; 10 normal cells, half of them wrongly called ALL.
    y = np.array([1] * 10 + [0] * 10)
    pred = np.array([1] * 10 + [1] * 5 + [0] * 5)
    cm = confusion(y, pred)
    assert cm == {"tp": 10, "fn": 0, "tn": 5, "fp": 5}
    assert sensitivity(cm) == 1.0  # recall of `all`
    assert specificity(cm) == 0.5  # recall of `hem`
    # Keras' alphabetical folder order (all=0, hem=1) would report these two swapped.
    swapped = confusion(1 - y, 1 - pred)
    assert sensitivity(swapped) == 0.5


def test_weighted_f1_weights_each_class_by_its_support() -> None:
    y = np.array([1] * 8 + [0] * 2)
    pred = np.array([1] * 8 + [1, 0])
    f1_all = 2 * 8 / (2 * 8 + 1 + 0)
    f1_hem = 2 * 1 / (2 * 1 + 0 + 1)
    assert weighted_f1(y, pred) == pytest.approx(0.8 * f1_all + 0.2 * f1_hem)


def test_auc_orders_by_p_all() -> None:
    y = np.array([0, 0, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert roc_auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert roc_auc(np.array([1, 1]), np.array([0.2, 0.3])) is None


def test_threshold_maximises_weighted_f1() -> None:
    rng = np.random.default_rng(0)
    y = np.array([1] * 300 + [0] * 150)
    p = np.clip(np.where(y == 1, rng.normal(0.8, 0.1, 450), rng.normal(0.35, 0.1, 450)), 0, 1)
    t = choose_threshold(y, p)
    best = weighted_f1(y, p >= t)
    for other in np.linspace(0.05, 0.95, 37):
        assert weighted_f1(y, p >= other) <= best + 1e-12


def test_summary_counts_subjects_and_per_subject_accuracy() -> None:
    y = np.array([1, 1, 0, 0])
    p = np.array([0.9, 0.2, 0.1, 0.3])
    out = summarize(y, p, 0.5, ["7", "7", "H7", "H7"])
    assert out["per_subject_accuracy"] == {"7": 0.5, "H7": 1.0}
    assert out["n_subjects"] == 2 and out["n_cells"] == 4
    assert out["sensitivity"] == 0.5 and out["specificity"] == 1.0
