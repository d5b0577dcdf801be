"""The least-privilege role allscore_submitter (PostgreSQL only): what a lab pipeline's `allscore submit`,
`status`, `report`, `cancel` and `wait_for_job` need, and nothing more.

- models: read and register the model version a submission pins (ensure_model);
- jobs: read and create (create_job);
- samples: read, create and reset (enqueue_sample's upsert), fail the ones the broker did not take, cancel;
- cells: delete the cells of a sample it resubmits or cancels (and read, which such a DELETE needs); never write;
- the analyst views and sample_reviews: read (status, report, report --reviews).

No review tables, no DDL. Its password comes from ALLSCORE_SUBMITTER_DB_PASSWORD at `allscore db upgrade`
(db.roles); without one the role cannot log in.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from db.roles import create_role, drop_grants

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SUBMITTER = "allscore_submitter"

GRANTS = (
    "GRANT SELECT, INSERT ON models, jobs TO {role}",
    "GRANT SELECT, INSERT, UPDATE ON samples TO {role}",
    "GRANT SELECT, DELETE ON cells TO {role}",
    "GRANT SELECT ON sample_results, cell_results, sample_reviews TO {role}",
    # models.id and samples.id are serials: inserting a row needs its sequence.
    "GRANT USAGE ON SEQUENCE models_id_seq, samples_id_seq TO {role}",
)
REVOKES = (
    "REVOKE ALL ON models, jobs, samples, cells FROM {role}",
    "REVOKE ALL ON sample_results, cell_results, sample_reviews FROM {role}",
    "REVOKE ALL ON SEQUENCE models_id_seq, samples_id_seq FROM {role}",
)


def upgrade() -> None:
    """Create allscore_submitter with its grants."""
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    create_role(bind, SUBMITTER, GRANTS)


def downgrade() -> None:
    """Revoke this database's grants to allscore_submitter (the role stays: other databases may use it)."""
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    drop_grants(bind, SUBMITTER, REVOKES)
