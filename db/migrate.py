"""Bring a database to a schema revision with Alembic, safely from many containers at once."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, text

from db.engine import make_engine
from db.errors import MigrationError
from db.roles import set_role_passwords

log = logging.getLogger(__name__)

ALEMBIC_INI = Path(__file__).with_name("alembic.ini")
# Every allscore migrator takes this PostgreSQL advisory lock ("allscore" in ASCII, fits a bigint).
ADVISORY_LOCK_KEY = int.from_bytes(b"allscore", "big")


def alembic_config() -> Config:
    """The Alembic configuration shipped inside the package; works from any working directory."""
    return Config(str(ALEMBIC_INI))


@contextmanager
def locked_connection(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that holds the migration lock until it commits or rolls back."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Transaction-scoped, so a crashed migrator cannot leave it held. PostgreSQL's DDL is
            # transactional: a second migrator waits here, then finds the schema at head.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
        # SQLite needs nothing more: the engine begins with BEGIN IMMEDIATE, one writer at a time.
        yield connection


def head_revision() -> str:
    """The newest revision this code knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise MigrationError(f"no migrations found next to {ALEMBIC_INI}; the installation is broken")
    return head


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Upgrade the database at `url` (default: settings' database_url) to `revision`."""
    engine = make_engine(url)
    try:
        with locked_connection(engine) as connection:
            before = _current(connection)
            config = alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
            after = _current(connection)
            # Every upgrade sets the roles' passwords from the environment: a new one rotates it.
            set_role_passwords(connection)
    except (CommandError, RevisionError) as exc:
        raise MigrationError(
            f"cannot upgrade the database to revision {revision!r}: {exc}. If the database is at a revision "
            f"this allscore does not know, install the allscore version that wrote it (this one knows up to "
            f"{head_revision()!r})"
        ) from exc
    finally:
        engine.dispose()
    if before == after:
        log.info("database schema already at revision %s", after)
    else:
        log.info("database schema upgraded from revision %s to %s", before, after)


def current_revision(url: str | None = None) -> str | None:
    """The revision the database at `url` is at, or None before the first upgrade."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return _current(connection)
    finally:
        engine.dispose()
