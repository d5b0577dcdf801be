"""The least-privilege role allscore_submitter (PostgreSQL only): what a lab pipeline's `allscore submit`,
`status`, `report`, `cancel` and `wait_for_job` need, and nothing more.

- models: read and register the model version a submission pins (ensure_model);
- jobs: read and create (create_job);
- samples: read, create and reset (enqueue_sample's upsert), fail the ones the broker did not take, cancel;
- cells: delete the cells of a sample it resubmits or cancels (and read, which such a DELETE needs); never write;
- the analyst views and sample_reviews: read (status, report, report --reviews).

No review tables, no DDL. Its password comes from ALLSCORE_SUBMITTER_DB_PASSWORD at `allscore db upgrade`
(db.roles); without one the role cannot log in.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SUBMITTER = "allscore_submitter"

# Roles are cluster-wide while the migration lock is per database: a concurrent CREATE ROLE is caught.
CREATE_SUBMITTER_SQL = f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{SUBMITTER}') THEN
        BEGIN
            CREATE ROLE {SUBMITTER} NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END
$$
"""

GRANTS = (
    "GRANT SELECT, INSERT ON models, jobs TO {role}",
    "GRANT SELECT, INSERT, UPDATE ON samples TO {role}",
    "GRANT SELECT, DELETE ON cells TO {role}",
    "GRANT SELECT ON sample_results, cell_results, sample_reviews TO {role}",
    # models.id and samples.id are serials: inserting a row needs its sequence.
    "GRANT USAGE ON SEQUENCE models_id_seq, samples_id_seq TO {role}",
)


def _schema(bind: sa.Connection) -> str:
    return bind.dialect.identifier_preparer.quote_identifier(
        str(bind.execute(sa.text("SELECT current_schema()")).scalar())
    )


def upgrade() -> None:
    """Create allscore_submitter with its grants."""
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    bind.execute(sa.text(CREATE_SUBMITTER_SQL))
    grant_connect = f"GRANT CONNECT ON DATABASE %I TO {SUBMITTER}"
    bind.execute(sa.text(f"DO $$ BEGIN EXECUTE format('{grant_connect}', current_database()); END $$"))
    bind.execute(sa.text(f"GRANT USAGE ON SCHEMA {_schema(bind)} TO {SUBMITTER}"))
    for grant in GRANTS:
        bind.execute(sa.text(grant.format(role=SUBMITTER)))


def downgrade() -> None:
    """Revoke this database's grants to allscore_submitter (the role stays: other databases may use it)."""
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    bind.execute(sa.text(f"REVOKE ALL ON models, jobs, samples, cells FROM {SUBMITTER}"))
    bind.execute(sa.text(f"REVOKE ALL ON sample_results, cell_results, sample_reviews FROM {SUBMITTER}"))
    bind.execute(sa.text(f"REVOKE ALL ON SEQUENCE models_id_seq, samples_id_seq FROM {SUBMITTER}"))
    bind.execute(sa.text(f"REVOKE USAGE ON SCHEMA {_schema(bind)} FROM {SUBMITTER}"))
    bind.execute(
        sa.text(
            f"DO $$ BEGIN EXECUTE format('REVOKE CONNECT ON DATABASE %I FROM {SUBMITTER}', current_database()); END $$"
        )
    )
