"""The per-sample result from the per-cell results: fraction, Wilson interval, Rogan-Gladen, flags."""

from __future__ import annotations

from collections.abc import Sequence
from statistics import median

from core.contract import CellResult, FieldRecord, SampleSummary
from core.stats import rogan_gladen, wilson_interval

LOW_COUNT_FLAG = "low_count"


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
    low_count: int = 0,
    fields: Sequence[FieldRecord] | None = None,
) -> SampleSummary:
    """Counts over the counted rows (every image; for fields, whole lymphoid cells and unreadable fields),
    fraction and interval over the scored ones.

    `low_count`: below this many scored cells the flag `low_count` is raised (0: never). `fields`, for a field
    sample: one record per field read.
    """
    counted = [c for c in cells if c.counted]
    scored = [c for c in counted if c.error is None and c.p_all is not None]
    n_scored = len(scored)
    n_all = sum(1 for c in scored if c.is_all)
    fraction = n_all / n_scored if n_scored else None
    ci_low, ci_high = wilson_interval(n_all, n_scored) if n_scored else (None, None)
    corrected = None
    if fraction is not None and sensitivity is not None and specificity is not None:
        corrected = rogan_gladen(fraction, sensitivity, specificity)
    mean_p = sum(c.p_all for c in scored if c.p_all is not None) / n_scored if n_scored else None
    flags = [flag_name(t) for t in sorted(flag_thresholds) if fraction is not None and fraction >= t]
    if n_scored < low_count:
        flags.append(LOW_COUNT_FLAG)
    extra: dict[str, object] = {}
    if fields is not None:
        scales = [f.um_per_px for f in fields if f.um_per_px is not None and f.error is None]
        sources = {f.scale_source for f in fields if f.scale_source is not None and f.error is None}
        extra = {
            "n_fields": len(fields),
            "n_fields_failed": sum(1 for f in fields if f.error is not None),
            "n_other": sum(f.n_other for f in fields),
            "n_edge": sum(f.n_edge for f in fields),
            "um_per_px": median(scales) if scales else None,
            "scale_source": (sources.pop() if len(sources) == 1 else "mixed") if sources else None,
        }
    return SampleSummary(
        n_cells=len(counted),
        n_all=n_all,
        n_failed=len(counted) - n_scored,
        all_fraction=fraction,
        ci_low=ci_low,
        ci_high=ci_high,
        corrected_fraction=corrected,
        mean_p_all=mean_p,
        flags=tuple(flags),
        **extra,  # type: ignore[arg-type]
    )
