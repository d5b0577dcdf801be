"""The analyst views, a public contract, described as tables so reads get typed values.

They live in their own MetaData: they are created by SQL in the migrations, never by create_all,
and autogenerate must not mistake them for tables.
"""

from __future__ import annotations

from sqlalchemy import Boolean, Column, Double, Integer, MetaData, String, Table, Text

from db.coltypes import UtcDateTime

view_metadata = MetaData()

sample_results = Table(
    "sample_results",
    view_metadata,
    Column("sample_id", String),
    Column("job_id", String),
    Column("status", String),
    Column("model_version", String),
    Column("n_cells", Integer),
    Column("n_all", Integer),
    Column("n_failed", Integer),
    Column("all_fraction", Double),
    Column("ci_low", Double),
    Column("ci_high", Double),
    Column("corrected_fraction", Double),
    Column("mean_p_all", Double),
    Column("flags", Text),
    Column("submitted_at", UtcDateTime),
    Column("started_at", UtcDateTime),
    Column("finished_at", UtcDateTime),
    Column("error", Text),
    Column("kind", String),
    Column("n_fields", Integer),
    Column("n_fields_failed", Integer),
    Column("n_other", Integer),
    Column("n_edge", Integer),
    Column("um_per_px", Double),
    Column("scale_source", String),
)

cell_results = Table(
    "cell_results",
    view_metadata,
    Column("sample_id", String),
    Column("image_uri", Text),
    Column("p_all", Double),
    Column("is_all", Boolean),
    Column("error", Text),
    Column("model_version", String),
    Column("scored_at", UtcDateTime),
    Column("field_uri", Text),
    Column("cell_index", Integer),
    Column("bbox_x0", Integer),
    Column("bbox_y0", Integer),
    Column("bbox_x1", Integer),
    Column("bbox_y1", Integer),
    Column("centroid_x", Double),
    Column("centroid_y", Double),
    Column("area_um2", Double),
    Column("cell_kind", String),
    Column("edge", Boolean),
    Column("um_per_px", Double),
    Column("scale_source", String),
    Column("outline", Text),
)

field_results = Table(
    "field_results",
    view_metadata,
    Column("sample_id", String),
    Column("model_version", String),
    Column("field_uri", Text),
    Column("field_index", Integer),
    Column("um_per_px", Double),
    Column("scale_source", String),
    Column("n_found", Integer),
    Column("n_scored", Integer),
    Column("n_other", Integer),
    Column("n_edge", Integer),
    Column("error", Text),
)

ANALYST_VIEWS = (sample_results.name, cell_results.name, field_results.name)
