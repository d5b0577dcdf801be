"""Alembic environment: runs the migrations on a connection that holds the migration lock."""

from __future__ import annotations

import logging.config

from alembic import context
from sqlalchemy import Connection

from db.engine import make_engine
from db.errors import MigrationError
from db.migrate import locked_connection
from db.models import Base


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _main() -> None:
    if context.is_offline_mode():
        raise MigrationError(
            "offline (--sql) migrations are not supported: the analyst-role revision inspects the live "
            "database; run 'allscore db upgrade' against it instead"
        )
    config = context.config
    # db.migrate.upgrade hands in a connection that already holds the lock and the transaction.
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    # Run from the alembic command line: configure its logging and take the same lock.
    if config.config_file_name:
        logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)
    engine = make_engine(config.get_main_option("sqlalchemy.url") or None)
    try:
        with locked_connection(engine) as locked:
            _run(locked)
    finally:
        engine.dispose()


_main()
