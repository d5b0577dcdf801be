"""Review: reviewers (review_users), their verdicts on cells (cell_verdicts) and sign-offs (sample_signoffs), the
view sample_reviews, and the role allscore_reviewer (PostgreSQL only) that the review app logs in as.

Verdicts are keyed by (sample_id, model_version, image_uri), never by a result row: a re-score keeps them, and no
result row is ever edited. sample_reviews has one row per sample result: how many scored cells were reviewed,
agreed with or corrected, the reviewed fraction (the model's calls with the reviewer's corrections applied; cells
corrected to `other` or `not_a_cell` leave the denominator) and the sign-off. The existing views are unchanged.

allscore_reviewer may read the analyst views, sample_reviews and models (for the threshold), and write only
cell_verdicts, sample_signoffs and review_users. allscore_analyst may read sample_reviews.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REVIEWER = "allscore_reviewer"
ANALYST = "allscore_analyst"

# Frozen here rather than imported from db.reviews: a migration must keep meaning what it meant.
# Only scored cells (p_all not null) are reviewed; a verdict that agrees keeps the model's call.
SAMPLE_REVIEWS_SQL = """
CREATE VIEW sample_reviews AS
SELECT
    r.sample_id,
    r.model_version,
    COUNT(r.image_uri) AS n_scored,
    COUNT(r.verdict_uri) AS n_reviewed,
    COALESCE(SUM(CASE WHEN r.verdict_uri IS NOT NULL AND r.agree THEN 1 ELSE 0 END), 0) AS n_agree,
    COALESCE(SUM(CASE WHEN r.verdict_uri IS NOT NULL AND NOT r.agree THEN 1 ELSE 0 END), 0) AS n_disagree,
    COALESCE(SUM(CASE WHEN r.final_class = 'all' THEN 1 ELSE 0 END), 0) AS n_all_reviewed,
    COALESCE(SUM(CASE WHEN r.final_class IN ('other', 'not_a_cell') THEN 1 ELSE 0 END), 0) AS n_excluded,
    CAST(SUM(CASE WHEN r.final_class = 'all' THEN 1 ELSE 0 END) AS DOUBLE PRECISION)
        / NULLIF(SUM(CASE WHEN r.final_class IN ('all', 'hem') THEN 1 ELSE 0 END), 0) AS reviewed_fraction,
    MAX(r.reviewed_at) AS last_reviewed_at,
    o.reviewer AS signed_off_by,
    o.signed_at AS signed_off_at,
    o.comment AS sign_off_comment
FROM (
    SELECT
        s.sample_id, s.model_version, c.image_uri, v.image_uri AS verdict_uri, v.agree, v.reviewed_at,
        CASE
            WHEN c.image_uri IS NULL THEN NULL
            WHEN v.image_uri IS NULL OR v.agree THEN CASE WHEN c.is_all THEN 'all' ELSE 'hem' END
            ELSE v.corrected_class
        END AS final_class
    FROM samples AS s
    LEFT JOIN cells AS c ON c.sample_pk = s.id AND c.p_all IS NOT NULL
    LEFT JOIN cell_verdicts AS v
        ON v.sample_id = s.sample_id AND v.model_version = s.model_version AND v.image_uri = c.image_uri
) AS r
LEFT JOIN sample_signoffs AS o ON o.sample_id = r.sample_id AND o.model_version = r.model_version
GROUP BY r.sample_id, r.model_version, o.reviewer, o.signed_at, o.comment
"""

CREATE_REVIEWER_SQL = f"""
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{REVIEWER}') THEN
        BEGIN
            CREATE ROLE {REVIEWER} NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END IF;
END
$$
"""

GRANT_ANALYST_SQL = f"""
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{ANALYST}') THEN
        GRANT SELECT ON sample_reviews TO {ANALYST};
    END IF;
END
$$
"""


def _schema(bind: sa.Connection) -> str:
    return bind.dialect.identifier_preparer.quote_identifier(
        str(bind.execute(sa.text("SELECT current_schema()")).scalar())
    )


def upgrade() -> None:
    """Create the review tables, the view sample_reviews and the role allscore_reviewer with its grants."""
    op.create_table(
        "review_users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("can_write", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_review_users"),
        sa.UniqueConstraint("name", name="uq_review_users_name"),
    )
    op.create_table(
        "cell_verdicts",
        sa.Column("sample_id", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(256), nullable=False),
        sa.Column("image_uri", sa.Text(), nullable=False),
        sa.Column("agree", sa.Boolean(), nullable=False),
        sa.Column("corrected_class", sa.String(16), nullable=True),
        sa.Column("reviewer", sa.String(64), nullable=False),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sample_id", "model_version", "image_uri", name="pk_cell_verdicts"),
        sa.CheckConstraint(
            "corrected_class IS NULL OR corrected_class IN ('all', 'hem', 'other', 'not_a_cell')",
            name="ck_cell_verdicts_corrected_class",
        ),
        sa.CheckConstraint(
            "(agree AND corrected_class IS NULL) OR (NOT agree AND corrected_class IS NOT NULL)",
            name="ck_cell_verdicts_agree_or_corrected",
        ),
    )
    op.create_table(
        "sample_signoffs",
        sa.Column("sample_id", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(256), nullable=False),
        sa.Column("reviewer", sa.String(64), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("signed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sample_id", "model_version", name="pk_sample_signoffs"),
    )
    op.execute(SAMPLE_REVIEWS_SQL)
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    bind.execute(sa.text(GRANT_ANALYST_SQL))
    bind.execute(sa.text(CREATE_REVIEWER_SQL))
    bind.execute(
        sa.text(f"DO $$ BEGIN EXECUTE format('GRANT CONNECT ON DATABASE %I TO {REVIEWER}', current_database()); END $$")
    )
    bind.execute(sa.text(f"GRANT USAGE ON SCHEMA {_schema(bind)} TO {REVIEWER}"))
    bind.execute(sa.text(f"GRANT SELECT ON sample_results, cell_results, sample_reviews, models TO {REVIEWER}"))
    bind.execute(sa.text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON cell_verdicts, sample_signoffs TO {REVIEWER}"))
    bind.execute(sa.text(f"GRANT SELECT, INSERT, UPDATE ON review_users TO {REVIEWER}"))
    # review_users.id is a serial: inserting a user needs its sequence.
    bind.execute(sa.text(f"GRANT USAGE ON SEQUENCE review_users_id_seq TO {REVIEWER}"))


def downgrade() -> None:
    """Drop the view, the review tables and this database's grants to allscore_reviewer (the role stays)."""
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        bind.execute(sa.text(f"REVOKE ALL ON sample_results, cell_results, models FROM {REVIEWER}"))
        bind.execute(sa.text(f"REVOKE USAGE ON SCHEMA {_schema(bind)} FROM {REVIEWER}"))
        bind.execute(
            sa.text(
                f"DO $$ BEGIN EXECUTE format('REVOKE CONNECT ON DATABASE %I FROM {REVIEWER}', current_database()); "
                "END $$"
            )
        )
    op.execute("DROP VIEW IF EXISTS sample_reviews")
    op.drop_table("sample_signoffs")
    op.drop_table("cell_verdicts")
    op.drop_table("review_users")
