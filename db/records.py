"""What the worker hands to the repository: one result per cell and one summary per sample.

The worker computes every number; these records only refuse values that cannot be right, so a bug
upstream fails loudly instead of landing in the analysts' views.
"""

from __future__ import annotations

from dataclasses import dataclass

# Flags are stored comma-separated in one text column (see models.Sample.flags).
FLAG_SEPARATOR = ","


def _check_probability(owner: str, field: str, value: float | None) -> None:
    # `not (0 <= x <= 1)` is also true for NaN, which SQLite would silently store as NULL.
    if value is not None and not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
        raise ValueError(f"{owner}.{field}={value!r} must be a number in [0, 1] or None")


@dataclass(frozen=True, slots=True)
class CellResult:
    """The outcome for one image: a probability and call, or the error that kept it from being scored."""

    image_uri: str
    p_all: float | None
    is_all: bool | None
    error: str | None = None

    def __post_init__(self) -> None:
        if not self.image_uri:
            raise ValueError("CellResult.image_uri must not be empty")
        _check_probability("CellResult", "p_all", self.p_all)


@dataclass(frozen=True, slots=True)
class SampleSummary:
    """The per-sample numbers; fractions are over the scored cells (n_cells - n_failed)."""

    n_cells: int
    n_all: int
    n_failed: int
    all_fraction: float | None
    ci_low: float | None
    ci_high: float | None
    corrected_fraction: float | None
    mean_p_all: float | None
    flags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if min(self.n_cells, self.n_all, self.n_failed) < 0:
            raise ValueError(f"SampleSummary counts must be non-negative, got {self}")
        if self.n_all + self.n_failed > self.n_cells:
            raise ValueError(
                f"SampleSummary.n_all={self.n_all} plus n_failed={self.n_failed} exceeds n_cells={self.n_cells}"
            )
        for field in ("all_fraction", "ci_low", "ci_high", "corrected_fraction", "mean_p_all"):
            _check_probability("SampleSummary", field, getattr(self, field))
        for flag in self.flags:
            if not flag or FLAG_SEPARATOR in flag or flag != flag.strip():
                raise ValueError(
                    f"SampleSummary flag {flag!r} must be a non-empty name without "
                    f"{FLAG_SEPARATOR!r} or surrounding spaces"
                )
