"""Calibration (trainer/calibration.py): the expected calibration error reads what a reliability diagram shows, and
temperature scaling, fitted on held-out predictions, repairs a deliberately miscalibrated model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer.calibration import apply_temperature, expected_calibration_error, fit_temperature
from trainer.metrics import roc_auc


def _cells(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated cells: a logit per cell, and a label drawn with exactly the probability the logit says."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    p = 1.0 / (1.0 + np.exp(-z))
    return p, (rng.random(n) < p).astype(int)


def test_the_error_reads_a_reliability_diagram() -> None:
    # 100 cells said 0.9 of which 60 are ALL, 100 said 0.1 of which 10 are: |0.6 - 0.9| over half the cells
    p = np.r_[np.full(100, 0.9), np.full(100, 0.1)]
    y = np.r_[np.ones(60), np.zeros(40), np.ones(10), np.zeros(90)]
    assert expected_calibration_error(p, y) == pytest.approx(0.5 * 0.3 + 0.5 * 0.0)
    # a model that says what happens scores (close to) 0
    good_p, good_y = _cells(20000, 0)
    assert expected_calibration_error(good_p, good_y) < 0.02


@pytest.mark.parametrize("true_temperature", [0.4, 3.0])
def test_temperature_scaling_repairs_an_over_or_under_confident_model(true_temperature: float) -> None:
    # The model says the calibrated logit times T: under-confident for T < 1 (logits shrunk), over-confident for
    # T > 1 (stretched); dividing by the fitted temperature should undo it.
    p, y = _cells(8000, 1)
    said = apply_temperature(p, 1.0 / true_temperature)
    fit_p, fit_y, test_p, test_y = said[:4000], y[:4000], said[4000:], y[4000:]
    before = expected_calibration_error(test_p, test_y)
    t = fit_temperature(fit_p, fit_y)  # fitted on cells the evaluation does not see
    after = expected_calibration_error(apply_temperature(test_p, t), test_y)
    assert t == pytest.approx(true_temperature, rel=0.15)
    assert before > 0.05 and after < before / 3, (before, after)
    # monotone: the ranking (AUC) is the same before and after
    assert roc_auc(test_y, apply_temperature(test_p, t)) == pytest.approx(roc_auc(test_y, test_p), abs=1e-9)


def test_bad_input_is_refused_with_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="both classes"):
        fit_temperature([0.2, 0.9], [1, 1])
    with pytest.raises(ValueError, match="as many labels"):
        expected_calibration_error([0.2, 0.9], [1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([0.2, 1.5], [1, 0])
    with pytest.raises(ValueError, match="positive"):
        apply_temperature([0.5], 0.0)


def test_the_worker_serves_p_all_at_the_versions_temperature(tmp_path: Path) -> None:
    # A stand-in model says p = brightness / 255; at temperature 2 the engine reports sigmoid(logit(p) / 2), and the
    # threshold applies to that (0.5 is the same call either way: the scaling is monotone and keeps 0.5).
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from core.storage import LocalStore
    from worker.engine import score_cells

    def model(x: np.ndarray, training: bool = False) -> np.ndarray:
        return (x.reshape(len(x), -1).mean(axis=1) / 255.0).reshape(-1, 1)

    uris = []
    for value in (51, 128, 230):
        path = tmp_path / f"cell_{value}.png"
        Image.new("RGB", (20, 20), (value, value, value)).save(path)
        uris.append(str(path))
    with ThreadPoolExecutor(2) as pool:
        plain, warm = (
            score_cells(
                uris, model=model, size=8, threshold=0.5, temperature=t, fetch=LocalStore().read_bytes, pool=pool
            )
            for t in (1.0, 2.0)
        )
    p = np.array([c.p_all for c in plain], dtype=np.float64)
    np.testing.assert_allclose(p, [51 / 255, 128 / 255, 230 / 255], atol=1e-6)
    served = np.array([c.p_all for c in warm], dtype=np.float64)
    np.testing.assert_allclose(served, 1 / (1 + np.exp(-np.log(p / (1 - p)) / 2)), atol=1e-9)
    assert [c.is_all for c in warm] == [c.is_all for c in plain] == [False, True, True]
