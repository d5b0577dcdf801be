"""The database layer on SQLite (the embedded default): migrations, views, repository, engine.

The scenarios (tests/harness/scenarios.py) run here and unchanged on PostgreSQL in tests/integration/test_db.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError, StatementError

from core.contract import CellResult, SampleSummary
from core.settings import get_settings
from db import repository as repo
from db.engine import SQLITE_BUSY_TIMEOUT_MS, make_engine, parse_url, transaction
from db.errors import DatabaseUrlError
from db.migrate import alembic_config, current_revision, head_revision, upgrade
from db.models import Cell, Job
from tests.harness.db import (
    TABLES,
    Factory,
    assert_migrated_to_head,
    make_cells,
    results,
    run_concurrently,
    score,
    submit,
    table_counts,
)
from tests.harness.scenarios import SAMPLE_SCENARIOS, Scenario, scenario_id


def test_upgrade_creates_the_tables_the_views_and_what_the_models_say(db_url: str, engine: Engine) -> None:
    assert_migrated_to_head(engine, db_url)


def test_upgrade_is_idempotent_and_revision_is_none_before(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert current_revision(url) is None
    upgrade(url)
    upgrade(url)
    assert current_revision(url) == head_revision()


def test_downgrade_to_base_and_back(db_url: str, engine: Engine) -> None:
    with engine.begin() as conn:
        config = alembic_config()
        config.attributes["connection"] = conn
        command.downgrade(config, "base")
    inspector = inspect(engine)
    assert not TABLES & set(inspector.get_table_names())
    assert inspector.get_view_names() == []
    upgrade(db_url)
    assert current_revision(db_url) == head_revision()


def test_concurrent_upgrades_of_one_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'race.db'}"
    errors = run_concurrently([lambda: upgrade(url)] * 3)
    assert errors == []
    assert current_revision(url) == head_revision()


@pytest.mark.parametrize("scenario", SAMPLE_SCENARIOS, ids=scenario_id)
def test_repository(factory: Factory, scenario: Scenario) -> None:
    scenario(factory)


def test_concurrent_workers_on_one_file(factory: Factory) -> None:
    # Worker processes share the SQLite file: read-then-write transactions must wait, not fail.
    ids = [f"S{i}" for i in range(12)]
    submit(factory, "job-w", ids)
    cells = make_cells("s3://lab/x", [0.9, 0.1, None])
    per_thread = [ids[i::4] for i in range(4)]

    def work(mine: list[str]) -> Callable[[], None]:
        def run() -> None:
            for sample_id in mine:
                score(factory, sample_id, "cnn:1", cells)

        return run

    assert run_concurrently([work(mine) for mine in per_thread]) == []
    rows = results(factory, job_id="job-w")
    assert [r["status"] for r in rows] == ["done"] * len(ids)
    assert table_counts(factory)["cells"] == len(ids) * len(cells)


def test_transaction_commits_or_rolls_back(factory: Factory) -> None:
    with transaction(factory) as s:
        repo.create_job(session=s, job_id="kept", n_samples=0)
    with pytest.raises(RuntimeError), transaction(factory) as s:
        repo.create_job(session=s, job_id="dropped", n_samples=0)
        raise RuntimeError("boom")
    with transaction(factory) as s:
        assert set(s.execute(select(Job.id)).scalars()) == {"kept"}


def test_sqlite_engine_settings(engine: Engine, db_url: str) -> None:
    assert Path(parse_url(db_url).database or "").is_file(), "the missing parent folder was created"
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_TIMEOUT_MS


def test_foreign_keys_are_enforced(factory: Factory) -> None:
    submit(factory, "job-f", ["S1"])
    score(factory, "S1", "cnn:1", make_cells("s3://lab/S1", [0.9]))
    with transaction(factory) as s:
        s.execute(text("DELETE FROM samples"))
        assert s.execute(select(func.count()).select_from(Cell)).scalar_one() == 0, "cells cascade"
    with pytest.raises(IntegrityError, match="FOREIGN KEY"), transaction(factory) as s:
        s.execute(
            text("INSERT INTO samples (sample_id, job_id, model_version, status, submitted_at, attempts) "
                 "VALUES ('S2', 'no-such-job', 'cnn:1', 'queued', '2025-01-01 00:00:00', 0)")
        )  # fmt: skip


def test_default_url_is_a_file_under_allscore_home() -> None:
    engine = make_engine()
    try:
        database = Path(engine.url.database or "")
        assert database.parent == get_settings().home
        assert database.parent.is_dir()
    finally:
        engine.dispose()


def test_database_urls_get_their_driver_and_a_bad_one_names_the_setting() -> None:
    assert parse_url("postgresql://u:p@h:5432/d").drivername == "postgresql+psycopg"
    assert parse_url("postgres://u@h/d").drivername == "postgresql+psycopg"
    assert parse_url("sqlite:///x.db").drivername == "sqlite"
    with pytest.raises(DatabaseUrlError, match="ALLSCORE_DATABASE_URL"):
        parse_url("not a url")


def test_timestamps_are_utc_and_naive_ones_are_refused(factory: Factory) -> None:
    submit(factory, "job-t", ["S1"])
    (row,) = results(factory, sample_ids=["S1"])
    assert row["submitted_at"].utcoffset().total_seconds() == 0
    assert abs((datetime.now(UTC) - row["submitted_at"]).total_seconds()) < 60
    with pytest.raises(StatementError, match="no time zone"), transaction(factory) as s:
        s.add(Job(id="naive", submitted_at=datetime(2025, 1, 1), n_samples=0))


@pytest.mark.parametrize(
    ("make", "told"),
    [
        (lambda: SampleSummary(2, 2, 1, 1.0, 0.5, 1.0, None, 0.9), "exceeds n_cells"),
        (lambda: CellResult("a.bmp", math.nan, None), "p_all"),
        (lambda: SampleSummary(2, 1, 0, 1.5, 0.5, 1.0, None, 0.9), "all_fraction"),
        (lambda: SampleSummary(2, 1, 0, 0.5, 0.1, 0.9, None, 0.5, flags=("a,b",)), "flag"),
    ],
    ids=["more ALL and failed than cells", "NaN probability", "fraction over 1", "comma in a flag"],
)
def test_records_refuse_impossible_values(make: Callable[[], object], told: str) -> None:
    with pytest.raises(ValueError, match=told):
        make()


def test_every_summary_field_is_a_column_of_the_sample_row_and_the_view() -> None:
    """SampleSummary is the one list of the summary columns: the table and the analysts' view hold each of them."""
    from dataclasses import fields

    from core.contract import SampleSummary
    from db.models import Sample
    from db.rows import NO_SUMMARY
    from db.views import sample_results

    names = {f.name for f in fields(SampleSummary)}
    assert set(NO_SUMMARY) == names
    assert names <= set(Sample.__table__.columns.keys())
    assert names <= set(sample_results.columns.keys())
