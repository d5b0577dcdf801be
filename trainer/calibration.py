"""Calibration: whether p(ALL) means what it says, and temperature scaling to make it so.

- ``expected_calibration_error``: cells binned by p(ALL) into equal-width bins; the mean over bins, weighted by
  their cells, of |fraction of ALL cells - mean p(ALL)| (Naeini et al. 2015; Guo et al. 2017 for the multiclass
  form). 0 is perfect; a model that says 0.9 where 60 % are ALL scores about 0.3 there.
- ``fit_temperature``: one number T that divides the model's logit, log(p / (1 - p)) / T, chosen to minimise the
  negative log-likelihood of the labels (Guo et al. 2017). T > 1 softens an over-confident model, T < 1 sharpens an
  under-confident one. It is monotone: the ranking of the cells, and so the AUC, do not move; a decision threshold
  moves with it (``apply_temperature`` on the threshold gives the same calls).

``apply_temperature`` (core/calibration.py, shared with the worker) applies it.

Fit it on predictions the model did not train on (out of fold, or a validation split), never on training cells.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import minimize_scalar

from core.calibration import EPS, apply_temperature, logit

# The temperature is searched over [1/50, 50] (in log space): beyond that the model says nothing useful.
_LOG_T_BOUND = math.log(50.0)


def _check(p: ArrayLike, y: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    probs = np.asarray(p, dtype=np.float64).ravel()
    labels = np.asarray(y, dtype=np.float64).ravel()
    if probs.shape != labels.shape or probs.size == 0:
        raise ValueError(f"need as many labels as probabilities, and some: got {probs.size} and {labels.size}")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 (hem) or 1 (all)")
    if not (np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()):
        raise ValueError("probabilities must be numbers in [0, 1]")
    return probs, labels


def _nll(p: NDArray[np.float64], y: NDArray[np.float64]) -> float:
    q = np.clip(p, EPS, 1.0 - EPS)
    return float(-np.mean(y * np.log(q) + (1.0 - y) * np.log1p(-q)))


def fit_temperature(p: ArrayLike, y: ArrayLike) -> float:
    """The temperature that minimises the labels' negative log-likelihood (one-dimensional, bounded search)."""
    probs, labels = _check(p, y)
    if labels.min() == labels.max():
        raise ValueError("fitting a temperature needs cells of both classes")
    z = logit(probs)

    def loss(log_t: float) -> float:
        return _nll(1.0 / (1.0 + np.exp(-z / math.exp(log_t))), labels)

    found = minimize_scalar(loss, bounds=(-_LOG_T_BOUND, _LOG_T_BOUND), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(found.x))


def expected_calibration_error(p: ArrayLike, y: ArrayLike, bins: int = 15) -> float:
    """The expected calibration error of p(ALL) over ``bins`` equal-width bins (module docstring)."""
    probs, labels = _check(p, y)
    if bins < 1:
        raise ValueError(f"bins={bins}: need at least one bin")
    index = np.minimum((probs * bins).astype(np.int64), bins - 1)
    count = np.bincount(index, minlength=bins).astype(np.float64)
    said = np.bincount(index, weights=probs, minlength=bins)
    seen = np.bincount(index, weights=labels, minlength=bins)
    used = count > 0
    return float(np.sum(np.abs(seen[used] - said[used])) / probs.size)


__all__ = ["apply_temperature", "expected_calibration_error", "fit_temperature"]
