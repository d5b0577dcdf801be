"""Shared fixtures: an isolated ALLSCORE_HOME for every test, a real S3 server over HTTP (moto), and a migrated
database (`db_url`, `engine`, `factory`: SQLite here; tests/integration/conftest.py makes them PostgreSQL)."""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from core.settings import Settings, get_settings, reset_settings_cache
from db.engine import make_engine, session_factory
from db.migrate import upgrade
from tests.harness.db import Factory
from tests.helpers import require_service

__all__ = ["require_service"]

pytest_plugins = ["tests.fixtures"]

_AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# A developer's own AWS setup must not leak into the tests (profiles, tokens, a global endpoint).
_AWS_UNSET = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


def _aws_test_env(mp: pytest.MonkeyPatch, scratch: Path) -> None:
    for name, value in _AWS_TEST_ENV.items():
        mp.setenv(name, value)
    for name in _AWS_UNSET:
        mp.delenv(name, raising=False)
    mp.setenv("AWS_CONFIG_FILE", str(scratch / "aws-config-absent"))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(scratch / "aws-credentials-absent"))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point ALLSCORE_HOME at a fresh folder so that no test reads or writes ~/.allscore."""
    home = tmp_path / "allscore-home"
    monkeypatch.setenv("ALLSCORE_HOME", str(home))
    # TensorFlow in float32 unless a test asks otherwise (subprocesses inherit it), so that a result the test
    # computes in float32 is the worker's on every CPU. The default, auto, picks by CPU and version: its own tests
    # (test_runtimes, test_operations) unset or override these.
    monkeypatch.setenv("ALLSCORE_PRECISION", "float32")
    monkeypatch.setenv("ALLSCORE_RUNTIME", "tensorflow")
    reset_settings_cache()
    yield home
    reset_settings_cache()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on a free port of 127.0.0.1, for the whole session; yields its endpoint URL."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        require_service("moto server", False, f"cannot import moto.server ({exc}); install allscore[dev]")
        raise  # unreachable: require_service skipped or failed
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=5):
            pass
    except OSError as exc:
        server.stop()
        require_service("moto server", False, f"started at {endpoint} but does not answer ({exc})")
    with pytest.MonkeyPatch.context() as mp:
        _aws_test_env(mp, tmp_path_factory.mktemp("aws"))
        yield endpoint
    server.stop()


@pytest.fixture
def s3_settings(s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """get_settings() pointed at the test S3 server (ALLSCORE_S3_ENDPOINT_URL), with test credentials."""
    _aws_test_env(monkeypatch, tmp_path)
    monkeypatch.setenv("ALLSCORE_S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("ALLSCORE_S3_REGION", "us-east-1")
    reset_settings_cache()
    return get_settings()


@pytest.fixture
def s3_bucket(s3_settings: Settings) -> Iterator[str]:
    """A fresh, empty bucket on the test S3 server; yields s3://NAME and empties it afterwards."""
    import boto3

    client = boto3.session.Session().client(
        "s3", endpoint_url=s3_settings.s3_endpoint_url, region_name=s3_settings.s3_region
    )
    name = f"allscore-test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield f"s3://{name}"
    # Free the server's memory (moto keeps objects in this process).
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=item["Key"])
    client.delete_bucket(Bucket=name)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """The test's database, migrated to head: a new SQLite file in a folder that does not exist yet (the embedded
    default); under tests/integration, a new PostgreSQL database (tests/integration/conftest.py)."""
    url = f"sqlite:///{tmp_path / 'db' / 'allscore.db'}"
    upgrade(url)
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on db_url, disposed after the test."""
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def factory(engine: Engine) -> Factory:
    """The session factory the repository functions are called with."""
    return session_factory(engine)
