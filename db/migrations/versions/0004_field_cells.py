"""Cells found in microscope fields: where each lies in its field, its kind, and per-sample field counts.

cells gains field_uri, cell_index, the bounding box and centroid in field pixels, area_um2, cell_kind
('lymphoid' or 'other'), edge (cut by the field's border), the field's scale and where it came from, and the
outline; samples gains kind ('cells' or 'fields'), n_fields, n_fields_failed, n_other, n_edge and the scale.
The views keep every column they had, with the same names and meanings, and add the new ones at the end.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ANALYST = "allscore_analyst"

# Frozen here rather than imported from db.views: a migration must keep meaning what it meant.
SAMPLE_RESULTS_SQL = """
CREATE VIEW sample_results AS
SELECT
    s.sample_id, s.job_id, s.status, s.model_version,
    s.n_cells, s.n_all, s.n_failed,
    s.all_fraction, s.ci_low, s.ci_high, s.corrected_fraction, s.mean_p_all,
    s.flags, s.submitted_at, s.started_at, s.finished_at, s.error,
    s.kind, s.n_fields, s.n_fields_failed, s.n_other, s.n_edge, s.um_per_px, s.scale_source
FROM samples AS s
"""

CELL_RESULTS_SQL = """
CREATE VIEW cell_results AS
SELECT
    s.sample_id, c.image_uri, c.p_all, c.is_all, c.error, s.model_version, c.scored_at,
    c.field_uri, c.cell_index, c.bbox_x0, c.bbox_y0, c.bbox_x1, c.bbox_y1, c.centroid_x, c.centroid_y,
    c.area_um2, c.cell_kind, c.edge, c.um_per_px, c.scale_source, c.outline
FROM cells AS c
JOIN samples AS s ON s.id = c.sample_pk
"""

OLD_SAMPLE_RESULTS_SQL = """
CREATE VIEW sample_results AS
SELECT
    s.sample_id, s.job_id, s.status, s.model_version,
    s.n_cells, s.n_all, s.n_failed,
    s.all_fraction, s.ci_low, s.ci_high, s.corrected_fraction, s.mean_p_all,
    s.flags, s.submitted_at, s.started_at, s.finished_at, s.error
FROM samples AS s
"""

OLD_CELL_RESULTS_SQL = """
CREATE VIEW cell_results AS
SELECT
    s.sample_id, c.image_uri, c.p_all, c.is_all, c.error, s.model_version, c.scored_at
FROM cells AS c
JOIN samples AS s ON s.id = c.sample_pk
"""


def _cell_columns() -> tuple[sa.Column[Any], ...]:
    return (
        sa.Column("field_uri", sa.Text(), nullable=True),
        sa.Column("cell_index", sa.Integer(), nullable=True),
        sa.Column("bbox_x0", sa.Integer(), nullable=True),
        sa.Column("bbox_y0", sa.Integer(), nullable=True),
        sa.Column("bbox_x1", sa.Integer(), nullable=True),
        sa.Column("bbox_y1", sa.Integer(), nullable=True),
        sa.Column("centroid_x", sa.Double(), nullable=True),
        sa.Column("centroid_y", sa.Double(), nullable=True),
        sa.Column("area_um2", sa.Double(), nullable=True),
        sa.Column("cell_kind", sa.String(16), nullable=True),
        sa.Column("edge", sa.Boolean(), nullable=True),
        sa.Column("um_per_px", sa.Double(), nullable=True),
        sa.Column("scale_source", sa.String(16), nullable=True),
        sa.Column("outline", sa.Text(), nullable=True),
    )


def _sample_columns() -> tuple[sa.Column[Any], ...]:
    return (
        sa.Column("kind", sa.String(16), nullable=False, server_default="cells"),
        sa.Column("n_fields", sa.Integer(), nullable=True),
        sa.Column("n_fields_failed", sa.Integer(), nullable=True),
        sa.Column("n_other", sa.Integer(), nullable=True),
        sa.Column("n_edge", sa.Integer(), nullable=True),
        sa.Column("um_per_px", sa.Double(), nullable=True),
        sa.Column("scale_source", sa.String(16), nullable=True),
    )


def _views(sample_sql: str, cell_sql: str) -> None:
    op.execute("DROP VIEW IF EXISTS cell_results")
    op.execute("DROP VIEW IF EXISTS sample_results")
    op.execute(sample_sql)
    op.execute(cell_sql)
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        # A dropped view loses its grants: give the analyst role (0002) its SELECT back, if it exists.
        op.execute(
            f"DO $$ BEGIN IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{ANALYST}') THEN "
            f"GRANT SELECT ON sample_results, cell_results TO {ANALYST}; END IF; END $$"
        )


def upgrade() -> None:
    """Add the field columns and recreate the views with them at the end."""
    op.execute("DROP VIEW IF EXISTS cell_results")
    op.execute("DROP VIEW IF EXISTS sample_results")
    for column in _cell_columns():
        op.add_column("cells", column)
    for column in _sample_columns():
        op.add_column("samples", column)
    _views(SAMPLE_RESULTS_SQL, CELL_RESULTS_SQL)


def downgrade() -> None:
    """Back to 0003's columns and views."""
    op.execute("DROP VIEW IF EXISTS cell_results")
    op.execute("DROP VIEW IF EXISTS sample_results")
    for column in _cell_columns():
        op.drop_column("cells", column.name)
    for column in _sample_columns():
        op.drop_column("samples", column.name)
    _views(OLD_SAMPLE_RESULTS_SQL, OLD_CELL_RESULTS_SQL)
