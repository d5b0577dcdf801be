"""The sample status `cancelled`: a queued sample that is cancelled is never run, a running one stops at its next
batch (`allscore cancel`, db.repository.cancel_samples). Like done and failed it ends the sample: a delivery that
finds it writes nothing. The views pass the status through unchanged; no column changes.

PostgreSQL: the CHECK constraint ck_samples_status is dropped and made again with the new value. SQLite cannot
alter a constraint, and rebuilding samples would cascade-delete its cells (foreign keys are on) and break the
views on it; its CHECK is widened in place in the schema table instead, the procedure SQLite documents for
loosening a CHECK constraint (https://www.sqlite.org/lang_altertable.html, "otherwise"), which every existing row
still meets.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = "status IN ('queued', 'running', 'done', 'failed')"
NEW = "status IN ('queued', 'running', 'done', 'failed', 'cancelled')"


def _sqlite_replace_check(bind: sa.Connection, old: str, new: str) -> None:
    sql = bind.execute(sa.text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'samples'")).scalar()
    if sql is None or old not in sql:
        raise RuntimeError(f"samples' CHECK constraint is not the expected {old!r}: {sql!r}")
    version = int(bind.execute(sa.text("PRAGMA schema_version")).scalar() or 0)
    bind.execute(sa.text("PRAGMA writable_schema = ON"))
    bind.execute(
        sa.text("UPDATE sqlite_master SET sql = :sql WHERE type = 'table' AND name = 'samples'"),
        {"sql": sql.replace(old, new)},
    )
    bind.execute(sa.text(f"PRAGMA schema_version = {version + 1}"))
    bind.execute(sa.text("PRAGMA writable_schema = OFF"))
    problems = [row[0] for row in bind.execute(sa.text("PRAGMA integrity_check"))]
    if problems != ["ok"]:
        raise RuntimeError(f"SQLite integrity check after widening the status constraint: {problems}")


def _replace(old: str, new: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        _sqlite_replace_check(bind, old, new)
        return
    op.drop_constraint("ck_samples_status", "samples", type_="check")
    op.create_check_constraint("ck_samples_status", "samples", new)


def upgrade() -> None:
    """Allow the status `cancelled`."""
    _replace(OLD, NEW)


def downgrade() -> None:
    """Cancelled samples become failed ("cancelled"), then the status is no longer allowed."""
    op.execute("UPDATE samples SET status = 'failed', error = COALESCE(error, 'cancelled') WHERE status = 'cancelled'")
    _replace(NEW, OLD)
