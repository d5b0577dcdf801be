"""Temperature scaling of p(ALL), shared by the trainer (which fits the temperature) and whoever scores (which
applies the one a model version records): p' = sigmoid(logit(p) / T). T = 1 changes nothing; it is monotone, so
the ranking of the cells does not move, and a threshold chosen on p' gives the same calls as its preimage on p."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

# Probabilities are clipped this far from 0 and 1 before taking logits (float32 sigmoids saturate).
EPS = 1e-7


def logit(p: ArrayLike) -> NDArray[np.float64]:
    """log(p / (1 - p)), with p clipped to [EPS, 1 - EPS]."""
    q = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(q) - np.log1p(-q)


def apply_temperature(p: ArrayLike, temperature: float) -> NDArray[np.float64]:
    """p(ALL) after dividing its logit by ``temperature``; exactly p when the temperature is 1."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    probs = np.asarray(p, dtype=np.float64)
    if temperature == 1.0:
        return probs
    return 1.0 / (1.0 + np.exp(-logit(probs) / temperature))
