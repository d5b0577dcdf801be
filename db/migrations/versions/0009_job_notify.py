"""Completion callbacks: jobs gains notify_url (where to POST the job's summary once every sample has ended, given at
submit with --notify), notified_at (when a worker claimed the notification: at most one per job) and notify_status
(what came of it). allscore_worker may read those columns of jobs and update the last two, nothing else of jobs;
allscore_submitter may update the three (a retried job asks afresh).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WORKER = "allscore_worker"
SUBMITTER = "allscore_submitter"


def upgrade() -> None:
    """Add the callback columns to jobs; let allscore_worker claim and record notifications."""
    op.add_column("jobs", sa.Column("notify_url", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("notified_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("jobs", sa.Column("notify_status", sa.Text(), nullable=True))
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    bind.execute(sa.text(f"GRANT SELECT (id, notify_url, notified_at, notify_status) ON jobs TO {WORKER}"))
    bind.execute(sa.text(f"GRANT UPDATE (notified_at, notify_status) ON jobs TO {WORKER}"))
    # Retrying a job (the same job id and samples) asks for its callback afresh (db.repository.create_job).
    bind.execute(sa.text(f"GRANT UPDATE (notify_url, notified_at, notify_status) ON jobs TO {SUBMITTER}"))


def downgrade() -> None:
    """Drop the callback columns (and with them the worker's column grants)."""
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        bind.execute(sa.text(f"REVOKE SELECT (id, notify_url, notified_at, notify_status) ON jobs FROM {WORKER}"))
        bind.execute(sa.text(f"REVOKE UPDATE (notified_at, notify_status) ON jobs FROM {WORKER}"))
        bind.execute(sa.text(f"REVOKE UPDATE (notify_url, notified_at, notify_status) ON jobs FROM {SUBMITTER}"))
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+): rebuilding jobs would break the samples that reference it.
    for column in ("notify_status", "notified_at", "notify_url"):
        op.drop_column("jobs", column)
