"""The least-privilege role allscore_worker, and limits on allscore_analyst (PostgreSQL only).

allscore_worker may read and update samples and write and delete cells: what a scoring worker and the sweeper do.
allscore_analyst gets a 60 s statement timeout and at most 20 connections. Passwords are set by db.roles on every
upgrade, from the environment.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WORKER = "allscore_worker"
ANALYST = "allscore_analyst"

# Roles are cluster-wide while the migration lock is per database: a concurrent CREATE ROLE is caught.
CREATE_WORKER_SQL = f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{WORKER}') THEN
        BEGIN
            CREATE ROLE {WORKER} NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END
$$
"""

ANALYST_LIMITS_SQL = f"""
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{ANALYST}') THEN
        ALTER ROLE {ANALYST} CONNECTION LIMIT 20;
        ALTER ROLE {ANALYST} SET statement_timeout = '60s';
    END IF;
EXCEPTION WHEN internal_error THEN
    NULL;  -- another database's migration is setting the same cluster-wide limits right now
END
$$
"""


def _schema(bind: sa.Connection) -> str:
    return bind.dialect.identifier_preparer.quote_identifier(
        str(bind.execute(sa.text("SELECT current_schema()")).scalar())
    )


def upgrade() -> None:
    """Create allscore_worker with its grants; limit allscore_analyst."""
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    bind.execute(sa.text(CREATE_WORKER_SQL))
    bind.execute(
        sa.text(f"DO $$ BEGIN EXECUTE format('GRANT CONNECT ON DATABASE %I TO {WORKER}', current_database()); END $$")
    )
    schema = _schema(bind)
    bind.execute(sa.text(f"GRANT USAGE ON SCHEMA {schema} TO {WORKER}"))
    bind.execute(sa.text(f"GRANT SELECT, UPDATE ON samples TO {WORKER}"))
    bind.execute(sa.text(f"GRANT SELECT, INSERT, DELETE ON cells TO {WORKER}"))
    bind.execute(sa.text(ANALYST_LIMITS_SQL))


def downgrade() -> None:
    """Revoke this database's grants to allscore_worker (the role stays: other databases may use it)."""
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    bind.execute(sa.text(f"REVOKE ALL ON samples, cells FROM {WORKER}"))
    schema = _schema(bind)
    bind.execute(sa.text(f"REVOKE USAGE ON SCHEMA {schema} FROM {WORKER}"))
    bind.execute(
        sa.text(
            f"DO $$ BEGIN EXECUTE format('REVOKE CONNECT ON DATABASE %I FROM {WORKER}', current_database()); END $$"
        )
    )
