"""The services the integration tests run against: the machine's Redis, throwaway PostgreSQL databases, and
migrating one with the roles' passwords in the environment."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from db.engine import parse_url
from db.migrate import upgrade
from tests.helpers import require_service

LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"
# The PostgreSQL server the tests and the bench make throwaway databases on (its user may create databases).
ADMIN_URL_VARIABLE = "ALLSCORE_TEST_POSTGRES_URL"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def pg_admin_url_from_env() -> str:
    """ALLSCORE_TEST_POSTGRES_URL, else the machine's test server."""
    return os.environ.get(ADMIN_URL_VARIABLE, DEFAULT_ADMIN_URL)


def local_redis_url() -> str:
    """The machine's Redis; skips the test (fails it under CI) when it does not answer."""
    import redis

    try:
        redis.Redis.from_url(LOCAL_REDIS_URL, socket_connect_timeout=2).ping()
        ok, reason = True, ""
    except redis.RedisError as exc:
        ok, reason = False, f"no Redis at {LOCAL_REDIS_URL} ({exc})"
    require_service("Redis", ok, reason)
    return LOCAL_REDIS_URL


@contextmanager
def throwaway_database(admin_url: str) -> Iterator[str]:
    """A new empty database `allscore_test_<random>` on the server of admin_url (whose user may create databases);
    yields its URL and drops it (connections and all) afterwards."""
    name = f"allscore_test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(parse_url(admin_url), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield parse_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def upgrade_with_new_passwords(url: str, monkeypatch: pytest.MonkeyPatch, *variables: str) -> dict[str, str]:
    """Migrate url as `allscore db upgrade` does, with a new password in each variable (ALLSCORE_..._PASSWORD);
    returns them by variable. Each holds a quote, a percent sign and a backslash: they must survive the migration."""
    passwords = {variable: f"{variable.lower()}-{uuid.uuid4().hex}'%\\" for variable in variables}
    for variable, password in passwords.items():
        monkeypatch.setenv(variable, password)
    upgrade(url)
    return passwords


@contextmanager
def moto_server_process() -> Iterator[str]:
    """A moto S3 server in a process of its own (the bench's: it must not share the measuring process's GIL, as
    the tests' threaded server does); yields its endpoint URL."""
    from tests.harness.faults import free_port

    port = free_port()
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
