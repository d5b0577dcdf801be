"""The status `cancelled` on SQLite: migration 0007's constraint, cancel_samples, and deliveries that meet it.
(tests/integration/test_cancel.py runs the same on PostgreSQL with real workers.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from db import repository as repo
from db.engine import make_engine, session_factory, transaction
from db.errors import SampleCancelled, StaleDelivery
from db.migrate import alembic_config, upgrade
from db.records import CellResult, SampleSummary

VERSION = "m:v1"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'allscore.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _queue(sessions: sessionmaker[Session], job: str, *samples: str) -> dict[str, repo.Delivery]:
    with transaction(sessions) as s:
        repo.ensure_model(
            session=s, name="m", version="v1", uri="x", sha256="0" * 64, sensitivity=0.9, specificity=0.9, threshold=0.5
        )
        repo.create_job(session=s, job_id=job, n_samples=len(samples))
        return {
            sample: repo.Delivery(
                job, repo.enqueue_sample(session=s, job_id=job, sample_id=sample, model_version=VERSION).submission
            )
            for sample in samples
        }


def _status(sessions: sessionmaker[Session], sample: str) -> str:
    with sessions() as s:
        return str(repo.get_sample_status(session=s, sample_id=sample, model_version=VERSION))


def scenario_cancel(sessions: sessionmaker[Session]) -> None:
    """Shared with PostgreSQL: queued and running samples cancel, ended ones stay, deliveries then write nothing."""
    d = _queue(sessions, "job-c", "queued", "running", "done")
    with transaction(sessions) as s:
        repo.mark_running(session=s, sample_id="running", model_version=VERSION, delivery=d["running"])
        repo.mark_running(session=s, sample_id="done", model_version=VERSION, delivery=d["done"])
        cells = [CellResult("a.bmp", 0.9, True, None)]
        summary = SampleSummary(1, 1, 0, 1.0, 0.2, 1.0, None, 0.9, ())
        repo.record_sample_result(
            session=s, sample_id="done", model_version=VERSION, cells=cells, summary=summary, delivery=d["done"]
        )
    with sessions() as s:  # a running delivery is still the current one
        repo.check_current(session=s, sample_id="running", model_version=VERSION, delivery=d["running"])
    with transaction(sessions) as s:
        cancelled = repo.cancel_samples(session=s, job_id="job-c")
    assert [(c.sample_id, c.was) for c in cancelled] == [("queued", "queued"), ("running", "running")]
    assert [_status(sessions, x) for x in ("queued", "running", "done")] == ["cancelled", "cancelled", "done"]
    # The queued sample's message arrives: it is not run.
    with pytest.raises(SampleCancelled), transaction(sessions) as s:
        repo.mark_running(session=s, sample_id="queued", model_version=VERSION, delivery=d["queued"])
    # The running one asks before its next batch, and could not write its result anyway.
    with pytest.raises(SampleCancelled), sessions() as s:
        repo.check_current(session=s, sample_id="running", model_version=VERSION, delivery=d["running"])
    with pytest.raises(SampleCancelled), transaction(sessions) as s:
        repo.record_sample_result(
            session=s,
            sample_id="running",
            model_version=VERSION,
            cells=[CellResult("b.bmp", 0.1, False, None)],
            summary=SampleSummary(1, 0, 0, 0.0, 0.0, 0.8, None, 0.1, ()),
            delivery=d["running"],
        )
    with transaction(sessions) as s:  # nothing left to cancel
        assert repo.cancel_samples(session=s, sample_ids=["queued", "done"]) == []
    rows = {r["sample_id"]: r for r in _rows(sessions)}
    assert rows["running"]["error"] == "cancelled" and rows["running"]["finished_at"] is not None
    assert rows["done"]["n_cells"] == 1
    # A resubmission takes the sample again; a delivery of the cancelled submission is now just stale.
    d2 = _queue(sessions, "job-c2", "running")
    with pytest.raises(StaleDelivery) as raised, transaction(sessions) as s:
        repo.mark_running(session=s, sample_id="running", model_version=VERSION, delivery=d["running"])
    assert not isinstance(raised.value, SampleCancelled)
    with transaction(sessions) as s:
        repo.mark_running(session=s, sample_id="running", model_version=VERSION, delivery=d2["running"])


def _rows(sessions: sessionmaker[Session]) -> list[dict[str, object]]:
    with sessions() as s:
        return repo.get_sample_results(session=s, job_id="job-c")


def test_cancel(engine: Engine) -> None:
    scenario_cancel(session_factory(engine))


def test_the_status_constraint_takes_cancelled_and_still_refuses_others(engine: Engine) -> None:
    sessions = session_factory(engine)
    _queue(sessions, "job-k", "s")
    with engine.begin() as conn:
        conn.execute(text("UPDATE samples SET status = 'cancelled' WHERE sample_id = 's'"))
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(text("UPDATE samples SET status = 'bogus' WHERE sample_id = 's'"))
    # Downgrading past 0007 turns cancelled samples into failed ones, and the constraint refuses cancelled again.
    with engine.begin() as conn:
        config = alembic_config()
        config.attributes["connection"] = conn
        command.downgrade(config, "0006")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT status, error FROM samples")).one() == ("failed", "cancelled")
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(text("UPDATE samples SET status = 'cancelled'"))
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
