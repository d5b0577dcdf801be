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

from db.roles import create_role, drop_grants

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WORKER = "allscore_worker"
ANALYST = "allscore_analyst"

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


def upgrade() -> None:
    """Create allscore_worker with its grants; limit allscore_analyst."""
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    create_role(
        bind,
        WORKER,
        ["GRANT SELECT, UPDATE ON samples TO {role}", "GRANT SELECT, INSERT, DELETE ON cells TO {role}"],
    )
    bind.execute(sa.text(ANALYST_LIMITS_SQL))


def downgrade() -> None:
    """Revoke this database's grants to allscore_worker (the role stays: other databases may use it)."""
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    drop_grants(bind, WORKER, ["REVOKE ALL ON samples, cells FROM {role}"])
