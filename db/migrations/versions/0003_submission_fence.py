"""samples.submission: the fencing token each (re)submission bumps, so stale deliveries cannot write.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add samples.submission (existing rows: their first submission)."""
    op.add_column("samples", sa.Column("submission", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    """Drop samples.submission."""
    op.drop_column("samples", "submission")
