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


LYMPHOID = "lymphoid"
CELL_KINDS = (LYMPHOID, "other")


@dataclass(frozen=True, slots=True)
class FieldCell:
    """Where a cell found in a microscope field lies, and what it is (core.segment found it)."""

    field_uri: str
    cell_index: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in field pixels (x1, y1 exclusive)
    centroid: tuple[float, float]  # x, y in field pixels
    area_um2: float
    cell_kind: str
    edge: bool
    um_per_px: float
    scale_source: str
    outline: str  # JSON [[x, y], ...] in field pixels

    def __post_init__(self) -> None:
        if self.cell_kind not in CELL_KINDS:
            raise ValueError(f"FieldCell.cell_kind={self.cell_kind!r} must be one of {CELL_KINDS}")

    @property
    def scored(self) -> bool:
        """Whether the cell goes to the model: a whole lymphoid cell (edge and `other` cells are only counted)."""
        return self.cell_kind == LYMPHOID and not self.edge


@dataclass(frozen=True, slots=True)
class CellResult:
    """The outcome for one image or one cell of a field: a probability and call, or the error that kept it
    from being scored. A field's `other` and edge cells have neither: they are counted, not scored."""

    image_uri: str
    p_all: float | None
    is_all: bool | None
    error: str | None = None
    field: FieldCell | None = None

    def __post_init__(self) -> None:
        if not self.image_uri:
            raise ValueError("CellResult.image_uri must not be empty")
        _check_probability("CellResult", "p_all", self.p_all)

    @property
    def counted(self) -> bool:
        """Whether the row counts in n_cells: every image, every unreadable field, every whole lymphoid cell."""
        return self.field is None or self.field.scored


@dataclass(frozen=True, slots=True)
class FieldRecord:
    """One field of a field sample as the worker read it: its scale and what was found in it, or why it could not
    be read. A field with no white cell is a record with n_found 0 (not an error), so reviewers still see it."""

    field_uri: str
    field_index: int
    um_per_px: float | None = None
    scale_source: str | None = None
    n_found: int = 0
    n_scored: int = 0
    n_other: int = 0
    n_edge: int = 0
    error: str | None = None

    def __post_init__(self) -> None:
        if not self.field_uri:
            raise ValueError("FieldRecord.field_uri must not be empty")
        if min(self.field_index, self.n_found, self.n_scored, self.n_other, self.n_edge) < 0:
            raise ValueError(f"FieldRecord counts must be non-negative, got {self}")
        if self.n_scored + self.n_other + self.n_edge > self.n_found:
            raise ValueError(f"FieldRecord: scored + other + edge cells exceed the cells found, got {self}")


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
    # Field samples only (None for single-cell samples).
    n_fields: int | None = None
    n_fields_failed: int | None = None
    n_other: int | None = None
    n_edge: int | None = None
    um_per_px: float | None = None
    scale_source: str | None = None

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
