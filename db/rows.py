"""The rows the repository writes and the checks made before writing them: the identifier rule, the cleared
summary columns, the consistency of a summary with its cell results, and the cell and field row values built from
the records the worker hands in (core.contract). Nothing here touches a session."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from core import contract
from core.contract import FLAG_SEPARATOR, CellResult, FieldRecord, SampleSummary
from db.errors import InvalidIdentifierError, ResultMismatchError


def check_identifier(kind: str, value: str, max_length: int) -> str:
    """Return `value` if it can serve as a `kind` id (the one rule of core.contract), else raise."""
    try:
        return contract.check_identifier(value, kind, max_length)
    except contract.InvalidIdentifier as exc:
        raise InvalidIdentifierError(str(exc)) from None


def summary_columns(summary: SampleSummary | None) -> dict[str, Any]:
    """The sample row's summary columns, one per field of SampleSummary under the same name (flags joined by
    FLAG_SEPARATOR): the record is the one list of them. All None for None."""
    if summary is None:
        return dict.fromkeys((f.name for f in fields(SampleSummary)), None)
    columns = {f.name: getattr(summary, f.name) for f in fields(SampleSummary)}
    columns["flags"] = FLAG_SEPARATOR.join(summary.flags)
    return columns


# The summary columns, cleared whenever a result set stops being current.
NO_SUMMARY: dict[str, Any] = summary_columns(None)


# The field columns of a cell row that comes from a single-cell image (every row of one insert has all keys).
NO_FIELD: dict[str, Any] = dict.fromkeys(
    (
        "field_uri",
        "cell_index",
        "bbox_x0",
        "bbox_y0",
        "bbox_x1",
        "bbox_y1",
        "centroid_x",
        "centroid_y",
        "area_um2",
        "cell_kind",
        "edge",
        "um_per_px",
        "scale_source",
        "outline",
    )
)


def check_result(sample_id: str, model_version: str, cells: Sequence[CellResult], summary: SampleSummary) -> None:
    where = f"sample {sample_id!r} (model {model_version!r})"
    counted = [cell for cell in cells if cell.counted]
    if summary.n_cells != len(counted):
        raise ResultMismatchError(
            f"{where}: summary.n_cells={summary.n_cells} but {len(counted)} cell results count; "
            "every submitted image needs a cell result, failed ones with an error"
        )
    n_failed = sum(cell.error is not None for cell in counted)
    if summary.n_failed != n_failed:
        raise ResultMismatchError(
            f"{where}: summary.n_failed={summary.n_failed} but {n_failed} cell results carry an error"
        )
    seen: set[str] = set()
    for cell in cells:
        if cell.image_uri in seen:
            raise ResultMismatchError(f"{where}: image {cell.image_uri!r} appears twice; score each image once")
        seen.add(cell.image_uri)


def field_row(sample_pk: int, record: FieldRecord) -> dict[str, Any]:
    return {
        "sample_pk": sample_pk,
        "field_uri": record.field_uri,
        "field_index": record.field_index,
        "um_per_px": record.um_per_px,
        "scale_source": record.scale_source,
        "n_found": record.n_found,
        "n_scored": record.n_scored,
        "n_other": record.n_other,
        "n_edge": record.n_edge,
        "error": record.error,
    }


def cell_row(sample_pk: int, cell: CellResult, now: Any, with_field: bool) -> dict[str, Any]:
    row: dict[str, Any] = {
        "sample_pk": sample_pk,
        "image_uri": cell.image_uri,
        "p_all": cell.p_all,
        "is_all": cell.is_all,
        "error": cell.error,
        "scored_at": now,
    }
    if not with_field:
        return row
    row.update(NO_FIELD)  # every row of one insert has the same keys
    found = cell.field
    if found is not None:
        row.update(
            field_uri=found.field_uri,
            cell_index=found.cell_index,
            bbox_x0=found.bbox[0],
            bbox_y0=found.bbox[1],
            bbox_x1=found.bbox[2],
            bbox_y1=found.bbox[3],
            centroid_x=found.centroid[0],
            centroid_y=found.centroid[1],
            area_um2=found.area_um2,
            cell_kind=found.cell_kind,
            edge=found.edge,
            um_per_px=found.um_per_px,
            scale_source=found.scale_source,
            outline=found.outline,
        )
    return row
