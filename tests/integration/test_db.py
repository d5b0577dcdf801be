"""The database layer on a real PostgreSQL: the same scenarios as on SQLite, plus concurrency, volume and
the read-only analyst role."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from sqlalchemy import Engine, text

from db import repository as repo
from db.engine import make_engine, session_factory, transaction
from db.migrate import current_revision, head_revision, upgrade
from tests.harness.db import (
    TABLES,
    VIEWS,
    Factory,
    as_rows,
    assert_denied,
    assert_migrated_to_head,
    cell_set,
    cells_of,
    make_cells,
    results,
    role_engine,
    run_concurrently,
    score,
    submit,
    summarize,
)
from tests.harness.scenarios import SAMPLE_SCENARIOS, Scenario, scenario_id
from tests.harness.services import upgrade_with_new_passwords

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)


def test_upgrade_creates_the_tables_the_views_and_what_the_models_say(db_url: str, engine: Engine) -> None:
    assert_migrated_to_head(engine, db_url)


@pytest.mark.parametrize("scenario", SAMPLE_SCENARIOS, ids=scenario_id)
def test_repository(factory: Factory, scenario: Scenario) -> None:
    scenario(factory)


def test_concurrent_upgrades_of_a_fresh_database(pg_empty_url: str) -> None:
    # Several containers starting at once each run `allscore db upgrade`.
    assert run_concurrently([lambda: upgrade(pg_empty_url)] * 4) == []
    assert current_revision(pg_empty_url) == head_revision()
    engine = make_engine(pg_empty_url)
    try:
        with engine.connect() as conn:
            tables = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")).scalars()
            views = conn.execute(text("SELECT viewname FROM pg_views WHERE schemaname = current_schema()")).scalars()
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars()
            assert sorted(t for t in tables if t != "alembic_version") == sorted(TABLES)
            assert set(views) == VIEWS
            assert list(versions) == [head_revision()]
    finally:
        engine.dispose()


def test_bulk_insert_of_10000_cells(factory: Factory) -> None:
    n = 10_000
    # Deterministic spread of probabilities, with every 97th image unreadable.
    probabilities: list[float | None] = [None if i % 97 == 0 else (i * 7919 % 1000) / 1000 for i in range(n)]
    cells = make_cells("s3://lab/big", probabilities)
    submit(factory, "job-big", ["BIG"])
    with transaction(factory) as s:
        repo.mark_running(session=s, sample_id="BIG", model_version="cnn:1")
    started = time.perf_counter()
    with transaction(factory) as s:
        repo.record_sample_result(
            session=s, sample_id="BIG", model_version="cnn:1", cells=cells, summary=summarize(cells)
        )
    elapsed = time.perf_counter() - started
    log.info("recorded %d cell rows in %.3f s: %.0f rows/s", n, elapsed, n / elapsed)

    rows = cells_of(factory, "BIG")
    assert len(rows) == n
    assert cell_set(rows) == as_rows(cells)
    (summary,) = results(factory, sample_ids=["BIG"])
    assert summary["n_cells"] == n
    assert summary["n_all"] == sum(r["is_all"] is True for r in rows)
    assert summary["n_failed"] == sum(r["error"] is not None for r in rows)


def test_a_redelivered_task_waits_for_the_first_writer(factory: Factory) -> None:
    # Two deliveries of one sample write at once: the second must replace the first, not collide.
    submit(factory, "job-r", ["S1"])
    with transaction(factory) as s:
        repo.mark_running(session=s, sample_id="S1", model_version="cnn:1")
    first = make_cells("s3://lab/S1", [0.9, 0.1, 0.8])
    second = make_cells("s3://lab/S1", [0.2, 0.3])
    with factory() as holder:
        repo.record_sample_result(
            session=holder, sample_id="S1", model_version="cnn:1", cells=first, summary=summarize(first)
        )
        errors: list[BaseException] = []

        def redelivered() -> None:
            try:
                with transaction(factory) as s:
                    repo.record_sample_result(
                        session=s,
                        sample_id="S1",
                        model_version="cnn:1",
                        cells=second,
                        summary=summarize(second),
                    )
            except Exception as exc:  # noqa: BLE001 -- a thread's error, asserted on below
                errors.append(exc)

        thread = threading.Thread(target=redelivered)
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive(), "the second writer should wait for the first one's transaction"
        holder.commit()
    thread.join(timeout=30)
    assert errors == []
    assert cell_set(cells_of(factory, "S1")) == as_rows(second)
    (row,) = results(factory, sample_ids=["S1"])
    assert (row["status"], row["n_cells"]) == ("done", len(second))


@pytest.mark.reliability
def test_analyst_role_reads_the_views_and_cannot_write(pg_empty_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (password,) = upgrade_with_new_passwords(pg_empty_url, monkeypatch, "ALLSCORE_ANALYST_PASSWORD").values()
    owner = make_engine(pg_empty_url)
    try:
        factory = session_factory(owner)
        submit(factory, "job-an", ["S1"])
        cells = make_cells("s3://lab/S1", [0.9, 0.2, None])
        score(factory, "S1", "cnn:1", cells)
        with owner.connect() as conn:
            can_login = conn.execute(
                text("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'allscore_analyst'")
            ).scalar_one()
        assert can_login is True
    finally:
        owner.dispose()

    analyst = role_engine(pg_empty_url, "allscore_analyst", password)
    try:
        with analyst.connect() as conn:
            rows = conn.execute(text("SELECT sample_id, status, n_cells, n_failed FROM sample_results")).all()
            assert [tuple(r) for r in rows] == [("S1", "done", len(cells), 1)]
            n_cell_rows = conn.execute(text("SELECT count(*) FROM cell_results WHERE sample_id = 'S1'"))
            assert n_cell_rows.scalar_one() == len(cells)
        assert_denied(
            analyst,
            [
                "INSERT INTO jobs (id, submitted_at, n_samples) VALUES ('evil', now(), 0)",
                "UPDATE samples SET status = 'failed'",
                "DELETE FROM cells",
                "SELECT * FROM samples",
                "UPDATE sample_results SET status = 'failed'",
                "CREATE TABLE analyst_scratch (x int)",
            ],
        )
    finally:
        analyst.dispose()


def _scram_matches(verifier: str, password: str) -> bool:
    """Whether a PostgreSQL SCRAM-SHA-256 verifier (pg_authid.rolpassword) was made from `password` (RFC 5802)."""
    import base64
    import hashlib
    import hmac

    method, rest = verifier.split("$", 1)
    iterations_salt, keys = rest.split("$", 1)
    iterations, salt = iterations_salt.split(":")
    stored_key = keys.split(":")[0]
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return method == "SCRAM-SHA-256" and hashlib.sha256(client_key).digest() == base64.b64decode(stored_key)


@pytest.mark.reliability
def test_worker_role_writes_results_and_nothing_else_and_passwords_rotate_on_upgrade(
    pg_empty_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker_password, analyst_password = upgrade_with_new_passwords(
        pg_empty_url, monkeypatch, "ALLSCORE_WORKER_DB_PASSWORD", "ALLSCORE_ANALYST_PASSWORD"
    ).values()
    owner = make_engine(pg_empty_url)
    submit(session_factory(owner), "job-w", ["S1"])

    # The worker's role does a worker's whole job: running, then done, then failed on another delivery.
    worker = role_engine(pg_empty_url, "allscore_worker", worker_password)
    try:
        score(session_factory(worker), "S1", "cnn:1", make_cells("s3://lab/S1", [0.9, 0.2]))
        with transaction(session_factory(worker)) as s:
            repo.mark_failed(session=s, sample_id="S1", model_version="cnn:1", error="swept")
        assert_denied(
            worker,
            [
                "INSERT INTO jobs (id, submitted_at, n_samples) VALUES ('evil', now(), 0)",
                "DELETE FROM samples",
                "UPDATE models SET threshold = 0",
                "SELECT * FROM jobs",
                "DROP TABLE cells",
                "CREATE TABLE worker_scratch (x int)",
            ],
        )
    finally:
        worker.dispose()

    # The analyst's queries are limited; a new password set in the environment and upgraded again rotates it.
    # (This server trusts local connections, so a login cannot tell passwords apart: the stored verifier can.)
    def verifier() -> str:
        with owner.connect() as conn:
            return str(
                conn.execute(text("SELECT rolpassword FROM pg_authid WHERE rolname = 'allscore_analyst'")).scalar_one()
            )

    with owner.connect() as conn:
        limit, config = conn.execute(
            text("SELECT rolconnlimit, rolconfig FROM pg_roles WHERE rolname = 'allscore_analyst'")
        ).one()
    assert limit == 20 and "statement_timeout=60s" in config
    assert _scram_matches(verifier(), analyst_password)
    (rotated,) = upgrade_with_new_passwords(pg_empty_url, monkeypatch, "ALLSCORE_ANALYST_PASSWORD").values()
    after = verifier()
    owner.dispose()
    assert _scram_matches(after, rotated) and not _scram_matches(after, analyst_password)
    analyst = role_engine(pg_empty_url, "allscore_analyst")
    try:
        with analyst.connect() as conn:
            assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "1min"
    finally:
        analyst.dispose()
