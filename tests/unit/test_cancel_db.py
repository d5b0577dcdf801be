"""The status `cancelled` on SQLite: migration 0007's constraint. (The cancel scenario, shared with PostgreSQL, is
one of tests/harness/scenarios.py's SAMPLE_SCENARIOS; tests/integration/test_cancel.py runs it with real workers.)"""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError

from db.engine import session_factory
from db.migrate import alembic_config
from tests.harness.scenarios import queue


def test_the_status_constraint_takes_cancelled_and_still_refuses_others(engine: Engine) -> None:
    queue(session_factory(engine), "job-k", "s")
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
