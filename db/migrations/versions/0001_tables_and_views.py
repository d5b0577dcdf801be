"""Tables for models, jobs, samples and cells, and the analyst views sample_results and cell_results.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen here rather than imported from db.views: a migration must keep meaning what it meant.
# Plain SQL that PostgreSQL and SQLite both accept.
SAMPLE_RESULTS_SQL = """
CREATE VIEW sample_results AS
SELECT
    s.sample_id, s.job_id, s.status, s.model_version,
    s.n_cells, s.n_all, s.n_failed,
    s.all_fraction, s.ci_low, s.ci_high, s.corrected_fraction, s.mean_p_all,
    s.flags, s.submitted_at, s.started_at, s.finished_at, s.error
FROM samples AS s
"""

CELL_RESULTS_SQL = """
CREATE VIEW cell_results AS
SELECT
    s.sample_id, c.image_uri, c.p_all, c.is_all, c.error, s.model_version, c.scored_at
FROM cells AS c
JOIN samples AS s ON s.id = c.sample_pk
"""


def upgrade() -> None:
    """Create the tables and the analyst views."""
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("sensitivity", sa.Double(), nullable=True),
        sa.Column("specificity", sa.Double(), nullable=True),
        sa.Column("threshold", sa.Double(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_models"),
        sa.UniqueConstraint("name", "version", name="uq_models_name_version"),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("n_samples", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
    )
    op.create_table(
        "samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.String(128), nullable=False),
        sa.Column("job_id", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("n_cells", sa.Integer(), nullable=True),
        sa.Column("n_all", sa.Integer(), nullable=True),
        sa.Column("n_failed", sa.Integer(), nullable=True),
        sa.Column("all_fraction", sa.Double(), nullable=True),
        sa.Column("ci_low", sa.Double(), nullable=True),
        sa.Column("ci_high", sa.Double(), nullable=True),
        sa.Column("corrected_fraction", sa.Double(), nullable=True),
        sa.Column("mean_p_all", sa.Double(), nullable=True),
        sa.Column("flags", sa.Text(), nullable=True),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_samples"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_samples_job_id_jobs"),
        sa.UniqueConstraint("sample_id", "model_version", name="uq_samples_sample_id_model_version"),
        sa.CheckConstraint("status IN ('queued', 'running', 'done', 'failed')", name="ck_samples_status"),
    )
    op.create_index("ix_samples_job_id", "samples", ["job_id"])
    op.create_table(
        "cells",
        sa.Column("sample_pk", sa.Integer(), nullable=False),
        sa.Column("image_uri", sa.Text(), nullable=False),
        sa.Column("p_all", sa.Double(), nullable=True),
        sa.Column("is_all", sa.Boolean(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("scored_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sample_pk", "image_uri", name="pk_cells"),
        sa.ForeignKeyConstraint(["sample_pk"], ["samples.id"], name="fk_cells_sample_pk_samples", ondelete="CASCADE"),
    )
    op.execute(SAMPLE_RESULTS_SQL)
    op.execute(CELL_RESULTS_SQL)


def downgrade() -> None:
    """Drop the views, then the tables."""
    op.execute("DROP VIEW IF EXISTS cell_results")
    op.execute("DROP VIEW IF EXISTS sample_results")
    op.drop_table("cells")
    op.drop_index("ix_samples_job_id", table_name="samples")
    op.drop_table("samples")
    op.drop_table("jobs")
    op.drop_table("models")
