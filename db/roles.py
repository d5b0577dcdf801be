"""The PostgreSQL roles allscore's services log in as, and their passwords, set (and rotated) on every upgrade.

- ``allscore_analyst`` (migration 0002, limits in 0005): SELECT on the two analyst views, nothing else; a statement
  timeout and a connection limit, so an analyst's query cannot hold the database.
- ``allscore_worker`` (migration 0005): what a scoring worker and the sweeper need and nothing more: read and update
  sample rows, write and delete their cell rows. No jobs, no models, no DDL, no views.
- ``allscore_reviewer`` (migration 0006): what `allscore review` needs: read the analyst views, sample_reviews and
  models; write only the review tables (cell_verdicts, sample_signoffs, review_users).

- ``allscore_submitter`` (migration 0008): what a lab pipeline's submit, status, report and cancel need: read and
  create models and jobs, create, reset, fail and cancel samples, delete a resubmitted sample's cells, read the views.

Each role can log in once its password is set from the environment (``ALLSCORE_ANALYST_PASSWORD``,
``ALLSCORE_WORKER_DB_PASSWORD``, ``ALLSCORE_REVIEWER_DB_PASSWORD``, ``ALLSCORE_SUBMITTER_DB_PASSWORD``) by
``allscore db upgrade``; setting a new one and upgrading again rotates it.

`create_role` and `drop_grants` are what the role migrations (0005, 0008) run. Databases migrated long ago ran the
same statements: change what they send and past migrations no longer say what those databases hold. A role that
needs something else gets a new migration.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence

from sqlalchemy import Connection, text

log = logging.getLogger(__name__)

ROLE_PASSWORDS = {
    "allscore_analyst": "ALLSCORE_ANALYST_PASSWORD",
    "allscore_worker": "ALLSCORE_WORKER_DB_PASSWORD",
    "allscore_reviewer": "ALLSCORE_REVIEWER_DB_PASSWORD",
    "allscore_submitter": "ALLSCORE_SUBMITTER_DB_PASSWORD",
}

# The password travels as a bound parameter (set_config) and is quoted by the server (%L), so no character in it
# can break out of the statement. Two databases setting it at once make the loser fail with "tuple concurrently
# updated" (internal_error) once the winner commits: retry.
_SET_PASSWORD_SQL = """
DO $$
BEGIN
    FOR attempt IN 1..20 LOOP
        BEGIN
            EXECUTE format('ALTER ROLE %I LOGIN PASSWORD %L',
                           current_setting('allscore.role_name'), current_setting('allscore.role_password'));
            RETURN;
        EXCEPTION WHEN internal_error THEN
            PERFORM pg_sleep(0.05 * attempt);
        END;
    END LOOP;
    RAISE EXCEPTION 'could not set a role password: concurrent updates kept winning';
END
$$
"""


def set_role_passwords(connection: Connection) -> list[str]:
    """Set the password of each allscore role whose variable is set (PostgreSQL only); returns the roles set."""
    if connection.dialect.name != "postgresql":
        return []
    done = []
    for role, variable in ROLE_PASSWORDS.items():
        password = os.environ.get(variable)
        exists = connection.execute(text("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = :r"), {"r": role})
        if not password or exists.first() is None:
            continue
        connection.execute(text("SELECT set_config('allscore.role_name', :r, true)"), {"r": role})
        connection.execute(text("SELECT set_config('allscore.role_password', :p, true)"), {"p": password})
        connection.execute(text(_SET_PASSWORD_SQL))
        # Don't leave the secret readable for the rest of the transaction.
        connection.execute(text("SELECT set_config('allscore.role_password', '', true)"))
        done.append(role)
    if done:
        log.info("role passwords set from the environment: %s", ", ".join(done))
    return done


# Roles are cluster-wide while the migration lock is per database: a concurrent CREATE ROLE is caught.
_CREATE_ROLE_SQL = """
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{role}') THEN
        BEGIN
            CREATE ROLE {role} NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END
$$
"""
# The database's name is only known on the server.
_DATABASE_CONNECT_SQL = (
    "DO $$ BEGIN EXECUTE format('{verb} CONNECT ON DATABASE %I {to} {role}', current_database()); END $$"
)


def _role_name(role: str) -> str:
    # The name goes into SQL unquoted: only allscore's own lower-case names.
    if not re.fullmatch(r"allscore_[a-z]+", role):
        raise ValueError(f"not an allscore role name: {role!r}")
    return role


def current_schema(connection: Connection) -> str:
    """The connection's current schema, quoted as an identifier."""
    schema = connection.execute(text("SELECT current_schema()")).scalar()
    return connection.dialect.identifier_preparer.quote_identifier(str(schema))


def create_role(connection: Connection, role: str, grants: Sequence[str]) -> None:
    """Create `role` (NOLOGIN until db.roles sets its password) unless it exists, let it connect to this database and
    use its schema, then run `grants` (statements with `{role}` for the name). PostgreSQL only."""
    role = _role_name(role)
    connection.execute(text(_CREATE_ROLE_SQL.format(role=role)))
    connection.execute(text(_DATABASE_CONNECT_SQL.format(verb="GRANT", to="TO", role=role)))
    connection.execute(text(f"GRANT USAGE ON SCHEMA {current_schema(connection)} TO {role}"))
    for grant in grants:
        connection.execute(text(grant.format(role=role)))


def drop_grants(connection: Connection, role: str, revokes: Sequence[str]) -> None:
    """Run `revokes` (with `{role}`), then take back the schema and the database from `role`. The role itself stays:
    roles are cluster-wide, and other databases may use it. PostgreSQL only."""
    role = _role_name(role)
    for revoke in revokes:
        connection.execute(text(revoke.format(role=role)))
    connection.execute(text(f"REVOKE USAGE ON SCHEMA {current_schema(connection)} FROM {role}"))
    connection.execute(text(_DATABASE_CONNECT_SQL.format(verb="REVOKE", to="FROM", role=role)))
