"""Verdicts, sign-offs and the view sample_reviews on SQLite; the scenario_* functions run unchanged on PostgreSQL
in tests/integration/test_reviews_db.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import IntegrityError

from db import reviews
from db.engine import make_engine, session_factory, transaction
from db.migrate import upgrade
from db.records import CellResult
from tests.unit.test_db_sqlite import Factory, make_cells, score, submit

MODEL = "cnn:1"
# p(ALL) of sample S1's cells: 3 called ALL (>= 0.5), 4 normal, 1 unreadable.
PROBABILITIES: list[float | None] = [0.95, 0.8, 0.6, 0.4, 0.3, 0.2, 0.1, None]


def review_row(factory: Factory, sample_id: str = "S1", model_version: str = MODEL) -> dict[str, Any]:
    with transaction(factory) as s:
        (row,) = reviews.get_sample_reviews(session=s, sample_ids=[sample_id], model_version=model_version)
    return row


def verdict(factory: Factory, cell: CellResult, agree: bool, corrected: str | None, who: str = "ann") -> None:
    with transaction(factory) as s:
        reviews.record_verdict(
            session=s,
            sample_id="S1",
            model_version=MODEL,
            image_uri=cell.image_uri,
            agree=agree,
            corrected_class=corrected,
            reviewer=who,
        )


def scored_sample(factory: Factory) -> list[CellResult]:
    cells = make_cells("s3://lab/S1", PROBABILITIES)
    submit(factory, "job-r", ["S1"], MODEL)
    score(factory, "S1", MODEL, cells)
    return cells


def scenario_reviewed_fraction_and_sign_off(factory: Factory) -> None:
    """The view counts verdicts and applies corrections the way a reviewer reads them."""
    cells = scored_sample(factory)
    before = review_row(factory)
    assert (before["n_scored"], before["n_reviewed"], before["signed_off_by"]) == (7, 0, None)
    assert before["reviewed_fraction"] == pytest.approx(3 / 7)  # no verdicts: the model's own fraction

    verdict(factory, cells[0], True, None)  # ALL, agreed
    verdict(factory, cells[1], False, "hem")  # ALL -> hem
    verdict(factory, cells[3], False, "all")  # hem -> ALL
    verdict(factory, cells[4], False, "not_a_cell")  # hem -> not counted
    verdict(factory, cells[5], False, "other")  # hem -> another kind, not counted
    row = review_row(factory)
    assert (row["n_reviewed"], row["n_agree"], row["n_disagree"], row["n_excluded"]) == (5, 1, 4, 2)
    # ALL after review: cells 0, 2, 3; counted: 7 scored - 2 excluded.
    assert row["n_all_reviewed"] == 3
    assert row["reviewed_fraction"] == pytest.approx(3 / 5)
    assert row["last_reviewed_at"] is not None and row["last_reviewed_at"].tzinfo is not None

    # A verdict replaced keeps one row per cell; the newest wins.
    verdict(factory, cells[1], True, None, who="bob")
    with transaction(factory) as s:
        stored = reviews.verdicts(session=s, sample_id="S1", model_version=MODEL)
    assert len(stored) == 5
    assert (stored[cells[1].image_uri]["agree"], stored[cells[1].image_uri]["reviewer"]) == (True, "bob")
    assert review_row(factory)["reviewed_fraction"] == pytest.approx(4 / 5)

    with transaction(factory) as s:
        reviews.sign_off(session=s, sample_id="S1", model_version=MODEL, reviewer="ann", comment="checked")
    row = review_row(factory)
    assert (row["signed_off_by"], row["sign_off_comment"]) == ("ann", "checked")
    assert row["signed_off_at"] is not None


def scenario_verdicts_survive_a_rescore(factory: Factory) -> None:
    """Verdicts are keyed by sample, image and model version: a re-score (new cell rows) keeps them."""
    cells = scored_sample(factory)
    verdict(factory, cells[0], False, "hem")
    with transaction(factory) as s:
        reviews.sign_off(session=s, sample_id="S1", model_version=MODEL, reviewer="ann", comment="")
    submit(factory, "job-r2", ["S1"], MODEL)  # resubmission: the old cell rows are deleted
    score(factory, "S1", MODEL, cells)
    row = review_row(factory)
    assert (row["n_reviewed"], row["n_disagree"], row["signed_off_by"]) == (1, 1, "ann")
    assert row["reviewed_fraction"] == pytest.approx(2 / 7)
    # Another model version's result of the same sample has its own (no) verdicts.
    submit(factory, "job-r3", ["S1"], "cnn:2")
    score(factory, "S1", "cnn:2", cells)
    assert review_row(factory, model_version="cnn:2")["n_reviewed"] == 0


def scenario_refusals(factory: Factory) -> None:
    """Verdicts only on scored cells of a real result, with a class that says something."""
    cells = scored_sample(factory)
    with pytest.raises(reviews.ReviewError, match="no scored cell"):
        verdict(factory, cells[7], True, None)  # the unreadable image has no call to review
    with pytest.raises(reviews.ReviewError, match="no scored cell"), transaction(factory) as s:
        reviews.record_verdict(
            session=s,
            sample_id="S1",
            model_version="cnn:9",
            image_uri=cells[0].image_uri,
            agree=True,
            corrected_class=None,
            reviewer="ann",
        )
    with pytest.raises(reviews.ReviewError, match="is an agreement"):
        verdict(factory, cells[0], False, "all")
    with pytest.raises(reviews.ReviewError, match="corrected class"):
        verdict(factory, cells[0], False, "blast")
    with pytest.raises(reviews.ReviewError, match="no scored result"), transaction(factory) as s:
        reviews.sign_off(session=s, sample_id="S9", model_version=MODEL, reviewer="ann", comment="")
    # The table's own checks hold against a writer that skips db.reviews.
    with pytest.raises(IntegrityError), transaction(factory) as s:
        s.execute(
            text(
                "INSERT INTO cell_verdicts (sample_id, model_version, image_uri, agree, corrected_class, reviewer, "
                "reviewed_at) VALUES ('S1', 'cnn:1', 'x', :agree, 'blast', 'eve', CURRENT_TIMESTAMP)"
            ),
            {"agree": False},
        )
    with pytest.raises(IntegrityError), transaction(factory) as s:
        s.execute(
            text(
                "INSERT INTO cell_verdicts (sample_id, model_version, image_uri, agree, corrected_class, reviewer, "
                "reviewed_at) VALUES ('S1', 'cnn:1', 'x', :agree, 'hem', 'eve', CURRENT_TIMESTAMP)"
            ),
            {"agree": True},
        )
    with transaction(factory) as s:
        assert reviews.verdicts(session=s, sample_id="S1", model_version=MODEL) == {}


def scenario_users(factory: Factory) -> None:
    with transaction(factory) as s:
        reviews.add_user(session=s, name="ann", password_hash="h1", can_write=True)
    with pytest.raises(reviews.ReviewError, match="exists already"), transaction(factory) as s:
        reviews.add_user(session=s, name="ann", password_hash="h2", can_write=True)
    with transaction(factory) as s:
        reviews.add_user(session=s, name="ann", password_hash="h3", can_write=False, replace=True)
        found = reviews.get_user(session=s, name="ann")
        assert found == (reviews.Reviewer("ann", False), "h3")
        assert reviews.get_user(session=s, name="nobody") is None


# --- SQLite ------------------------------------------------------------------------------------------------


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'reviews.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def factory(engine: Engine) -> Factory:
    return session_factory(engine)


def test_the_view_has_its_columns(engine: Engine) -> None:
    assert [c["name"] for c in inspect(engine).get_columns("sample_reviews")] == reviews.SAMPLE_REVIEWS_COLUMNS


def test_reviewed_fraction_and_sign_off(factory: Factory) -> None:
    scenario_reviewed_fraction_and_sign_off(factory)


def test_verdicts_survive_a_rescore(factory: Factory) -> None:
    scenario_verdicts_survive_a_rescore(factory)


def test_refusals(factory: Factory) -> None:
    scenario_refusals(factory)


def test_users(factory: Factory) -> None:
    scenario_users(factory)


def test_report_shows_the_reviews(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import os
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'report.db'}"
    upgrade(url)
    engine = make_engine(url)
    factory = session_factory(engine)
    cells = scored_sample(factory)
    verdict(factory, cells[0], False, "hem")
    with transaction(factory) as s:
        reviews.sign_off(session=s, sample_id="S1", model_version=MODEL, reviewer="ann", comment="seen")
    engine.dispose()
    env = {**os.environ, "ALLSCORE_DATABASE_URL": url}

    def report(*args: str) -> str:
        run = subprocess.run(
            [sys.executable, "-m", "allscore", "report", "S1", *args], env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        return run.stdout

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
