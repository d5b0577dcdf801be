"""Per-sample statistics: the ALL fraction, its Wilson interval and the Rogan-Gladen correction."""

from __future__ import annotations

import math

# The two-sided 95% normal quantile, to the precision of a double.
Z_95 = 1.959963984540054


def _check_counts(k: int, n: int) -> None:
    if k < 0 or n < 0:
        raise ValueError(f"counts must be non-negative, got k={k}, n={n}")
    if k > n:
        raise ValueError(f"k={k} positives cannot exceed n={n} cells")


def fraction(k: int, n: int) -> float | None:
    """k/n, or None when there are no cells (n == 0), where no fraction is defined."""
    _check_counts(k, n)
    if n == 0:
        return None
    return k / n


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; (0.0, 1.0) when n == 0.

    With no cells nothing is known about the fraction, so the interval is the whole of [0, 1]
    rather than an error: an empty sample still gets a (maximally wide) result row.
    """
    _check_counts(k, n)
    if not (math.isfinite(z) and z > 0):
        raise ValueError(f"z must be a positive finite quantile, got {z}")
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = (z / denom) * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
    # At k == 0 and k == n the exact bounds are 0 and 1; rounding would otherwise leave ~1e-17 residue.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return (low, high)


def rogan_gladen(p: float, sensitivity: float, specificity: float) -> float | None:
    """Prevalence corrected for an imperfect classifier, clipped to [0, 1]; None where undefined.

    (p + specificity - 1) / (sensitivity + specificity - 1). When sensitivity + specificity <= 1
    the classifier is no better than chance and the correction has no meaning, so it returns None.
    """
    for name, value in (("p", p), ("sensitivity", sensitivity), ("specificity", specificity)):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name} must be a proportion in [0, 1], got {value}")
    youden = sensitivity + specificity - 1.0
    if youden <= 0.0:
        return None
    return min(1.0, max(0.0, (p + specificity - 1.0) / youden))
