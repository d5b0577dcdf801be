"""Engines, session factories and the one way to run a transaction."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings, get_settings
from db.errors import DatabaseUrlError

log = logging.getLogger(__name__)

# Several worker processes share one SQLite file; a writer waits this long for another before failing.
SQLITE_BUSY_TIMEOUT_MS = 30_000


def parse_url(url: str) -> URL:
    """Parse a database URL, mapping plain postgresql:// to the installed psycopg 3 driver."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise DatabaseUrlError(
            "the database URL (ALLSCORE_DATABASE_URL) is not a valid SQLAlchemy URL; expected "
            "sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB"
        ) from exc
    # Compose files and hosted databases hand out postgres:// or postgresql://, which SQLAlchemy
    # would map to psycopg2; only psycopg 3 is installed.
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _sqlite_file(url: URL) -> Path | None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def _set_wal(cursor: Any) -> None:
    """Put the file in WAL mode (once set, it stays). Switching needs an exclusive lock, and several processes
    opening a new file at once (concurrent `db upgrade`s) can get "database is locked" from the switch at once,
    busy_timeout or not: retry for up to the busy timeout."""
    import sqlite3
    import time

    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below own BEGIN; pysqlite's implicit one is deferred and
        # emitted late, which breaks transactional DDL and lets two writers deadlock on lock upgrade.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            # WAL lets readers (status, report) run while a worker writes.
            _set_wal(cursor)
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front, so busy_timeout applies instead of an instant
        # SQLITE_BUSY when a read-then-write transaction meets another writer.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def postgres_connect_args(settings: Settings) -> dict[str, Any]:
    """Connect, statement and lock timeouts, so a hung database is a transient fault rather than a hung task."""
    options = [
        f"-c statement_timeout={settings.db_statement_timeout_ms}",
        f"-c lock_timeout={settings.db_lock_timeout_ms}",
    ]
    return {"connect_timeout": settings.db_connect_timeout, "options": " ".join(options)}


def make_engine(url: str | None = None, settings: Settings | None = None) -> Engine:
    """An engine for `url` (default: settings' database_url), tuned for SQLite or PostgreSQL."""
    settings = settings or get_settings()
    parsed = parse_url(url if url is not None else settings.database_url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        path = _sqlite_file(parsed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            parsed = parsed.set(database=str(path))
        engine = create_engine(parsed)
        _configure_sqlite(engine)
    elif backend == "postgresql":
        # Connections die across database restarts and idle timeouts; check before use.
        engine = create_engine(parsed, pool_pre_ping=True, connect_args=postgres_connect_args(settings))
    else:
        engine = create_engine(parsed)
    log.debug("database engine for %s", parsed.render_as_string(hide_password=True))
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory bound to `engine`; objects stay readable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session in one transaction: committed when the block ends, rolled back if it raises."""
    with factory() as session, session.begin():
        yield session
