"""Verdicts, sign-offs and the view sample_reviews on SQLite; the scenarios (tests/harness/scenarios.py) run
unchanged on PostgreSQL in tests/integration/test_reviews_db.py."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import Engine, inspect

from db import reviews
from db.engine import transaction
from tests.harness.cli import run_allscore
from tests.harness.db import Factory
from tests.harness.scenarios import MODEL, REVIEW_SCENARIOS, Scenario, scenario_id, scored_sample, verdict


def test_the_view_has_its_columns(engine: Engine) -> None:
    assert [c["name"] for c in inspect(engine).get_columns("sample_reviews")] == reviews.SAMPLE_REVIEWS_COLUMNS


@pytest.mark.parametrize("scenario", REVIEW_SCENARIOS, ids=scenario_id)
def test_reviews(factory: Factory, scenario: Scenario) -> None:
    scenario(factory)


def test_report_shows_the_reviews(db_url: str, factory: Factory) -> None:
    cells = scored_sample(factory)
    verdict(factory, cells[0], False, "hem")
    with transaction(factory) as s:
        reviews.sign_off(session=s, sample_id="S1", model_version=MODEL, reviewer="ann", comment="seen")

    def report(*args: str) -> str:
        return run_allscore("report", "S1", *args, env={"ALLSCORE_DATABASE_URL": db_url}).stdout

    (row,) = json.loads(report("--reviews", "--format", "json"))
    assert (row["n_reviewed"], row["n_disagree"], row["signed_off_by"], row["sign_off_comment"]) == (
        1,
        1,
        "ann",
        "seen",
    )
    assert row["reviewed_fraction"] == pytest.approx(2 / 7)
    assert row["all_fraction"] == pytest.approx(3 / 7)
    table = report("--reviews")
    assert "28.6% (1 cells)" in table and "ann" in table
    (plain,) = json.loads(report("--format", "json"))
    assert "reviewed_fraction" not in plain  # the report's columns are unchanged without --reviews
