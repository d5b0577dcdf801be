"""The read-only role allscore_analyst (PostgreSQL only): SELECT on the analyst views, nothing else.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-01
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from db.errors import MigrationError

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("db.migrations")

ROLE = "allscore_analyst"
PASSWORD_VARIABLE = "ALLSCORE_ANALYST_PASSWORD"
VIEWS = ("sample_results", "cell_results")

# Roles are cluster-wide while our advisory lock is per database, so upgrades of two databases can
# race here: a concurrent CREATE ROLE is caught, not an error.
CREATE_ROLE_SQL = f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{ROLE}') THEN
        BEGIN
            CREATE ROLE {ROLE} NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END
$$
"""

# The password travels as a bound parameter (set_config) and is quoted by the server (%L), so no
# character in it can break out of the statement. Two databases setting it at once make the loser
# fail with "tuple concurrently updated" (internal_error) once the winner commits: retry.
SET_PASSWORD_SQL = f"""
DO $$
BEGIN
    FOR attempt IN 1..20 LOOP
        BEGIN
            EXECUTE format('ALTER ROLE {ROLE} LOGIN PASSWORD %L',
                           current_setting('allscore.analyst_password'));
            RETURN;
        EXCEPTION WHEN internal_error THEN
            PERFORM pg_sleep(0.05 * attempt);
        END;
    END LOOP;
    RAISE EXCEPTION 'could not set the password of role {ROLE}: concurrent updates kept winning';
END
$$
"""

GRANT_CONNECT_SQL = f"""
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO {ROLE}', current_database());
END
$$
"""


def _check_can_create_role(bind: sa.Connection) -> None:
    exists = bind.execute(sa.text("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = :r"), {"r": ROLE})
    if exists.first() is not None:
        return
    allowed = bind.execute(
        sa.text("SELECT rolcreaterole OR rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user")
    ).scalar()
    if not allowed:
        raise MigrationError(
            f"the database user running the migration cannot create the role {ROLE}; grant it CREATEROLE "
            f"or have an administrator run: CREATE ROLE {ROLE} NOLOGIN; then run 'allscore db upgrade' again"
        )


def upgrade() -> None:
    """Create allscore_analyst if missing, set its password from the environment, grant the views."""
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        log.info("no database roles on %s; skipping the analyst role", bind.dialect.name)
        return
    _check_can_create_role(bind)
    bind.execute(sa.text(CREATE_ROLE_SQL))
    password = os.environ.get(PASSWORD_VARIABLE)
    if password:
        bind.execute(sa.text("SELECT set_config('allscore.analyst_password', :p, true)"), {"p": password})
        bind.execute(sa.text(SET_PASSWORD_SQL))
        # Don't leave the secret readable for the rest of the transaction.
        bind.execute(sa.text("SELECT set_config('allscore.analyst_password', '', true)"))
    else:
        log.warning(
            "%s is not set: role %s has no password from this migration (a new role is NOLOGIN); "
            "set it and run ALTER ROLE %s LOGIN PASSWORD '...' to let analysts connect",
            PASSWORD_VARIABLE,
            ROLE,
            ROLE,
        )
    bind.execute(sa.text(GRANT_CONNECT_SQL))
    bind.execute(sa.text(f"GRANT USAGE ON SCHEMA {_schema(bind)} TO {ROLE}"))
    bind.execute(sa.text(f"GRANT SELECT ON {', '.join(VIEWS)} TO {ROLE}"))


def _schema(bind: sa.Connection) -> str:
    schema = bind.execute(sa.text("SELECT current_schema()")).scalar()
    if not schema:
        raise MigrationError("no current schema on PostgreSQL; check the search_path of the migration user")
    return bind.dialect.identifier_preparer.quote_identifier(schema)


def downgrade() -> None:
    """Revoke this database's grants; the role stays, since other databases of the cluster may use it."""
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    bind.execute(sa.text(f"REVOKE SELECT ON {', '.join(VIEWS)} FROM {ROLE}"))
    bind.execute(sa.text(f"REVOKE USAGE ON SCHEMA {_schema(bind)} FROM {ROLE}"))
    bind.execute(
        sa.text(f"DO $$ BEGIN EXECUTE format('REVOKE CONNECT ON DATABASE %I FROM {ROLE}', current_database()); END $$")
    )
