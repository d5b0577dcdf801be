"""Oracles: what a result should be, computed independently of the product's code."""

from __future__ import annotations

import math

# The two-sided 95 % normal quantile (tests/unit/test_stats.py holds it to scipy's).
Z_95 = 1.959963984540054


def wilson_by_inverting_the_score_test(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson interval by its definition, found numerically: the proportions p that the score test
    |k/n - p| / sqrt(p (1 - p) / n) <= z does not reject, their edges found by scipy's root finder."""
    from scipy.optimize import brentq

    p_hat = k / n

    def excess(p: float) -> float:
        return abs(p_hat - p) - z * math.sqrt(p * (1 - p) / n)

    # Inside the interval (at p_hat, nudged off 0 and 1 where the test's variance vanishes) `excess` is negative;
    # at 0 and 1 it is positive unless p_hat is that end, which then bounds the interval itself.
    inside = min(max(p_hat, 1e-300), 1 - 2**-53)
    low = 0.0 if k == 0 else brentq(excess, 0.0, inside, xtol=1e-15, rtol=1e-15)
    high = 1.0 if k == n else brentq(excess, inside, 1.0, xtol=1e-15, rtol=1e-15)
    return low, high
