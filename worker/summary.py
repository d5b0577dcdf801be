"""The per-sample result from the per-cell results: fraction, Wilson interval, Rogan-Gladen, flags."""

from __future__ import annotations

from collections.abc import Sequence

from core.stats import rogan_gladen, wilson_interval
from db.records import CellResult, SampleSummary


def flag_name(threshold: float) -> str:
    """The flag raised when a sample's ALL fraction reaches `threshold` (0.05 -> 'all_ge_5pct')."""
    pct = threshold * 100
    return f"all_ge_{pct:g}pct"


def summarize_sample(
    cells: Sequence[CellResult],
    *,
    sensitivity: float | None,
    specificity: float | None,
    flag_thresholds: Sequence[float],
) -> SampleSummary:
    """Counts over all submitted images; fraction and interval over the scored ones."""
    scored = [c for c in cells if c.error is None and c.p_all is not None]
    n_scored = len(scored)
    n_all = sum(1 for c in scored if c.is_all)
    fraction = n_all / n_scored if n_scored else None
    ci_low, ci_high = wilson_interval(n_all, n_scored) if n_scored else (None, None)
    corrected = None
    if fraction is not None and sensitivity is not None and specificity is not None:
        corrected = rogan_gladen(fraction, sensitivity, specificity)
    mean_p = sum(c.p_all for c in scored if c.p_all is not None) / n_scored if n_scored else None
    flags = tuple(flag_name(t) for t in sorted(flag_thresholds) if fraction is not None and fraction >= t)
    return SampleSummary(
        n_cells=len(cells),
        n_all=n_all,
        n_failed=len(cells) - n_scored,
        all_fraction=fraction,
        ci_low=ci_low,
        ci_high=ci_high,
        corrected_fraction=corrected,
        mean_p_all=mean_p,
        flags=flags,
    )
