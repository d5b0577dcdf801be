"""The fields of a field sample: sample_fields holds one row per field read (its scale, the white cells found in it
by kind, or why it could not be read), and the view field_results shows them by sample id and model version.

A field with no white cell used to leave no row anywhere: its overlay could not be drawn, and a reviewer could not
see it (the place where cells are most likely missed). Now it is a row with n_found 0.

Grants (PostgreSQL): allscore_worker writes the rows with a result and deletes them with it; allscore_submitter
deletes them when a sample is resubmitted or cancelled; every role that reads the views reads field_results.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WORKER = "allscore_worker"
SUBMITTER = "allscore_submitter"
READERS = ("allscore_analyst", "allscore_reviewer", "allscore_submitter")

# Frozen here rather than imported from db.views: a migration must keep meaning what it meant.
FIELD_RESULTS_SQL = """
CREATE VIEW field_results AS
SELECT
    s.sample_id, s.model_version, f.field_uri, f.field_index, f.um_per_px, f.scale_source,
    f.n_found, f.n_scored, f.n_other, f.n_edge, f.error
FROM sample_fields AS f
JOIN samples AS s ON s.id = f.sample_pk
"""


def upgrade() -> None:
    """Create sample_fields and the view field_results; grant them."""
    op.create_table(
        "sample_fields",
        sa.Column("sample_pk", sa.Integer(), nullable=False),
        sa.Column("field_uri", sa.Text(), nullable=False),
        sa.Column("field_index", sa.Integer(), nullable=False),
        sa.Column("um_per_px", sa.Double(), nullable=True),
        sa.Column("scale_source", sa.String(16), nullable=True),
        sa.Column("n_found", sa.Integer(), nullable=False),
        sa.Column("n_scored", sa.Integer(), nullable=False),
        sa.Column("n_other", sa.Integer(), nullable=False),
        sa.Column("n_edge", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["sample_pk"], ["samples.id"], name="fk_sample_fields_sample_pk_samples", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("sample_pk", "field_uri", name="pk_sample_fields"),
    )
    op.execute(FIELD_RESULTS_SQL)
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    bind.execute(sa.text(f"GRANT SELECT, INSERT, DELETE ON sample_fields TO {WORKER}"))
    bind.execute(sa.text(f"GRANT SELECT, DELETE ON sample_fields TO {SUBMITTER}"))
    for role in READERS:
        bind.execute(sa.text(f"GRANT SELECT ON field_results TO {role}"))


def downgrade() -> None:
    """Drop the view and the table (their grants go with them)."""
    op.execute("DROP VIEW IF EXISTS field_results")
    op.drop_table("sample_fields")
