"""Database fixtures for the integration tests: each test gets its own throwaway database.

- ``pg_admin_url``: the PostgreSQL server (ALLSCORE_TEST_POSTGRES_URL, default the local test server);
  skips when it is unreachable, fails under CI.
- ``pg_empty_url``: a new, empty database ``allscore_test_<random>``, dropped after the test.
- ``pg_url``: the same, migrated to head.
- ``db_url`` (and with it tests/conftest.py's ``engine`` and ``factory``): ``pg_url`` here, SQLite elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from core.settings import Settings, reset_settings_cache
from db.engine import parse_url
from db.migrate import upgrade
from tests.fixtures import PublishedModel
from tests.harness.services import ADMIN_URL_VARIABLE, local_redis_url, pg_admin_url_from_env, throwaway_database
from tests.helpers import require_service
from tests.integration.stack import Stack


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """URL of a PostgreSQL database whose user may create databases; skips (fails under CI) if down."""
    url = pg_admin_url_from_env()
    shown = parse_url(url).render_as_string(hide_password=True)
    engine = create_engine(parse_url(url), connect_args={"connect_timeout": 3})
    reason = ""
    try:
        with engine.connect():
            pass
    except OperationalError as exc:
        reason = f"cannot connect to {shown} ({exc.orig}); start PostgreSQL or set {ADMIN_URL_VARIABLE}"
    finally:
        engine.dispose()
    require_service("PostgreSQL", not reason, reason)
    return url


@pytest.fixture
def pg_empty_url(pg_admin_url: str) -> Iterator[str]:
    """URL of a new empty database on the test server, dropped (connections and all) after the test."""
    with throwaway_database(pg_admin_url) as url:
        yield url


@pytest.fixture
def pg_url(pg_empty_url: str) -> str:
    """URL of a new database on the test server, migrated to head; dropped after the test."""
    upgrade(pg_empty_url)
    return pg_empty_url


@pytest.fixture
def db_url(pg_url: str) -> str:
    """The integration tests' migrated database is PostgreSQL."""
    return pg_url


@pytest.fixture
def redis_url() -> str:
    """The machine's Redis (skips, or fails under CI, when it does not answer)."""
    return local_redis_url()


@pytest.fixture
def stack(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    s3_bucket: str,
    s3_settings: Settings,
    tiny_model: PublishedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Stack]:
    """A deployment on the local services; the test process is the lab pipeline (direct endpoints)."""
    assert s3_settings.s3_endpoint_url
    built = Stack(tmp_path, pg_url, redis_url, s3_settings.s3_endpoint_url, s3_bucket, tiny_model)
    for key, value in {
        "ALLSCORE_DATABASE_URL": pg_url,
        "ALLSCORE_BROKER_URL": redis_url,
        "ALLSCORE_QUEUE": built.queue,
        "ALLSCORE_MODEL_STORE": tiny_model.store,
    }.items():
        monkeypatch.setenv(key, value)
    reset_settings_cache()
    try:
        yield built
    finally:
        built.close()
