"""Verdicts, sign-offs and sample_reviews on a real PostgreSQL (the SQLite scenarios), and the roles: the review
app's allscore_reviewer writes only the review tables; the analysts read sample_reviews."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, inspect, text

from db import reviews
from db.engine import make_engine, session_factory, transaction
from tests.harness.db import Factory, assert_denied, role_engine
from tests.harness.scenarios import MODEL, REVIEW_SCENARIOS, Scenario, scenario_id, scored_sample
from tests.harness.services import upgrade_with_new_passwords

pytestmark = pytest.mark.integration


def test_the_view_has_its_columns(engine: Engine) -> None:
    assert [c["name"] for c in inspect(engine).get_columns("sample_reviews")] == reviews.SAMPLE_REVIEWS_COLUMNS


@pytest.mark.parametrize("scenario", REVIEW_SCENARIOS, ids=scenario_id)
def test_reviews(factory: Factory, scenario: Scenario) -> None:
    scenario(factory)


def test_reviewer_role_writes_only_reviews_and_analysts_read_them(
    pg_empty_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reviewer_password, analyst_password = upgrade_with_new_passwords(
        pg_empty_url, monkeypatch, "ALLSCORE_REVIEWER_DB_PASSWORD", "ALLSCORE_ANALYST_PASSWORD"
    ).values()
    owner = make_engine(pg_empty_url)
    try:
        cells = scored_sample(session_factory(owner))
    finally:
        owner.dispose()

    reviewer = role_engine(pg_empty_url, "allscore_reviewer", reviewer_password)
    try:
        factory = session_factory(reviewer)
        # What the review app does, as its role: add a user, record a verdict and a sign-off, read the views.
        with transaction(factory) as s:
            reviews.add_user(session=s, name="ann", password_hash="h", can_write=True)
            reviews.record_verdict(
                session=s,
                sample_id="S1",
                model_version=MODEL,
                image_uri=cells[0].image_uri,
                agree=False,
                corrected_class="hem",
                reviewer="ann",
            )
            reviews.sign_off(session=s, sample_id="S1", model_version=MODEL, reviewer="ann", comment="ok")
        with reviewer.connect() as conn:
            assert conn.execute(text("SELECT threshold FROM models")).all() == []  # readable (none registered here)
            assert conn.execute(text("SELECT count(*) FROM sample_results")).scalar_one() == 1
        assert_denied(
            reviewer,
            [
                "UPDATE samples SET status = 'failed'",
                "DELETE FROM cells",
                "UPDATE cells SET is_all = false",
                "SELECT * FROM samples",
                "INSERT INTO jobs (id, submitted_at, n_samples) VALUES ('evil', now(), 0)",
                "DELETE FROM review_users",
                "CREATE TABLE reviewer_scratch (x int)",
            ],
        )
    finally:
        reviewer.dispose()

    analyst = role_engine(pg_empty_url, "allscore_analyst", analyst_password)
    try:
        with analyst.connect() as conn:
            row = conn.execute(
                text("SELECT n_reviewed, n_disagree, reviewed_fraction, signed_off_by FROM sample_reviews")
            ).one()
            assert (row.n_reviewed, row.n_disagree, row.signed_off_by) == (1, 1, "ann")
            assert row.reviewed_fraction == pytest.approx(2 / 7)
        assert_denied(analyst, ["SELECT * FROM cell_verdicts", "DELETE FROM sample_signoffs"])
    finally:
        analyst.dispose()
