"""The database layer on SQLite (the embedded default): migrations, views, repository, engine.

The scenario_* functions take a session factory and run unchanged on PostgreSQL in
tests/integration/test_db.py.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from core.settings import get_settings
from db import repository as repo
from db.engine import SQLITE_BUSY_TIMEOUT_MS, make_engine, parse_url, session_factory, transaction
from db.errors import (
    DatabaseUrlError,
    InvalidIdentifierError,
    JobExistsError,
    JobNotFoundError,
    ModelConflictError,
    ResultMismatchError,
    SampleNotFoundError,
)
from db.migrate import alembic_config, current_revision, head_revision, upgrade
from db.models import Base, Cell, Job, Model, Sample
from db.records import CellResult, SampleSummary

# The analyst contract, written out here so that a change to it shows up as a failing test.
SAMPLE_RESULTS_COLUMNS = [
    "sample_id",
    "job_id",
    "status",
    "model_version",
    "n_cells",
    "n_all",
    "n_failed",
    "all_fraction",
    "ci_low",
    "ci_high",
    "corrected_fraction",
    "mean_p_all",
    "flags",
    "submitted_at",
    "started_at",
    "finished_at",
    "error",
    # Added for field samples (migration 0004), after the columns above, which keep their names and meanings.
    "kind",
    "n_fields",
    "n_fields_failed",
    "n_other",
    "n_edge",
    "um_per_px",
    "scale_source",
]
CELL_RESULTS_COLUMNS = [
    "sample_id",
    "image_uri",
    "p_all",
    "is_all",
    "error",
    "model_version",
    "scored_at",
    # Cells found in fields (migration 0004).
    "field_uri",
    "cell_index",
    "bbox_x0",
    "bbox_y0",
    "bbox_x1",
    "bbox_y1",
    "centroid_x",
    "centroid_y",
    "area_um2",
    "cell_kind",
    "edge",
    "um_per_px",
    "scale_source",
    "outline",
]
TABLES = {"models", "jobs", "samples", "cells", "review_users", "cell_verdicts", "sample_signoffs"}

Factory = sessionmaker[Session]


# --- helpers shared with the PostgreSQL tests ------------------------------------------------------------


def make_cells(prefix: str, probabilities: list[float | None], threshold: float = 0.5) -> list[CellResult]:
    """Cell results for the given probabilities; None stands for an image that could not be read."""
    return [
        CellResult(f"{prefix}/cell_{i:05d}.bmp", None, None, "cannot decode: truncated BMP")
        if p is None
        else CellResult(f"{prefix}/cell_{i:05d}.bmp", p, p >= threshold)
        for i, p in enumerate(probabilities)
    ]


def summarize(cells: list[CellResult]) -> SampleSummary:
    """A summary computed from the cells the way a user would check it (no interval maths needed here)."""
    scored = [c for c in cells if c.error is None]
    n_all = sum(bool(c.is_all) for c in scored)
    fraction = n_all / len(scored) if scored else None
    mean_p = sum(c.p_all or 0.0 for c in scored) / len(scored) if scored else None
    flags = tuple(name for name, cut in (("over_5pct", 0.05), ("over_20pct", 0.20)) if (fraction or 0) > cut)
    return SampleSummary(
        n_cells=len(cells),
        n_all=n_all,
        n_failed=len(cells) - len(scored),
        all_fraction=fraction,
        ci_low=None if fraction is None else max(0.0, fraction - 0.1),
        ci_high=None if fraction is None else min(1.0, fraction + 0.1),
        corrected_fraction=fraction,
        mean_p_all=mean_p,
        flags=flags,
    )


def cell_set(rows: list[dict[str, Any]]) -> set[tuple[object, ...]]:
    """The (image_uri, p_all, is_all, error) of view rows or CellResults, for set comparison."""
    return {(r["image_uri"], r["p_all"], r["is_all"], r["error"]) for r in rows}


def as_rows(cells: list[CellResult]) -> set[tuple[object, ...]]:
    """The same tuple shape as cell_set, from the records handed in."""
    return {(c.image_uri, c.p_all, c.is_all, c.error) for c in cells}


def score(factory: Factory, sample_id: str, model_version: str, cells: list[CellResult]) -> None:
    """What a worker does for one sample: running, then the result, each in its own transaction."""
    with transaction(factory) as s:
        repo.mark_running(session=s, sample_id=sample_id, model_version=model_version)
    with transaction(factory) as s:
        repo.record_sample_result(
            session=s, sample_id=sample_id, model_version=model_version, cells=cells, summary=summarize(cells)
        )


def submit(factory: Factory, job_id: str, sample_ids: list[str], model_version: str = "cnn:1") -> None:
    """What the submit client does: a job and its queued samples in one transaction."""
    with transaction(factory) as s:
        repo.create_job(session=s, job_id=job_id, n_samples=len(sample_ids))
        for sample_id in sample_ids:
            repo.enqueue_sample(session=s, job_id=job_id, sample_id=sample_id, model_version=model_version)


def results(factory: Factory, **filters: object) -> list[dict[str, Any]]:
    """Rows of sample_results."""
    with transaction(factory) as s:
        return repo.get_sample_results(session=s, **filters)  # type: ignore[arg-type]


def cells_of(factory: Factory, sample_id: str, model_version: str | None = None) -> list[dict[str, Any]]:
    """Rows of cell_results."""
    with transaction(factory) as s:
        return repo.get_cell_results(session=s, sample_id=sample_id, model_version=model_version)


def table_counts(factory: Factory) -> dict[str, int]:
    """Rows per table, read in a fresh transaction."""
    with transaction(factory) as s:
        return {
            model.__tablename__: s.execute(select(func.count()).select_from(model)).scalar_one()
            for model in (Model, Job, Sample, Cell)
        }


# --- scenarios, run on SQLite here and on PostgreSQL in tests/integration/test_db.py ----------------------


def scenario_flow(factory: Factory) -> None:
    """queued -> running -> done (and failed) as seen through the views."""
    submit(factory, "job-1", ["S1", "S2"])
    queued = results(factory, job_id="job-1")
    assert [(r["sample_id"], r["status"]) for r in queued] == [("S1", "queued"), ("S2", "queued")]
    assert all(r["n_cells"] is None and r["started_at"] is None for r in queued)

    with transaction(factory) as s:
        assert repo.mark_running(session=s, sample_id="S1", model_version="cnn:1") == 1
    (running,) = results(factory, sample_ids=["S1"])
    assert running["status"] == "running"
    assert isinstance(running["started_at"], datetime)
    assert running["started_at"].tzinfo is not None

    cells = make_cells("s3://lab/S1", [0.9, 0.2, None, 0.7, 0.4, 0.55, None, 0.01])
    with transaction(factory) as s:
        repo.record_sample_result(
            session=s, sample_id="S1", model_version="cnn:1", cells=cells, summary=summarize(cells)
        )
    (done,) = results(factory, sample_ids=["S1"])
    expected = summarize(cells)
    assert done["status"] == "done"
    assert (done["n_cells"], done["n_all"], done["n_failed"]) == (len(cells), 3, 2)
    assert done["all_fraction"] == pytest.approx(expected.all_fraction)
    assert done["mean_p_all"] == pytest.approx(expected.mean_p_all)
    assert done["flags"] == ",".join(expected.flags)
    assert done["error"] is None
    assert done["submitted_at"] <= done["started_at"] <= done["finished_at"]

    view_cells = cells_of(factory, "S1")
    assert len(view_cells) == len(cells)
    assert cell_set(view_cells) == as_rows(cells)
    assert all(r["model_version"] == "cnn:1" and r["sample_id"] == "S1" for r in view_cells)
    failed_cells = [r for r in view_cells if r["error"] is not None]
    assert len(failed_cells) == done["n_failed"]
    assert all(r["p_all"] is None and r["is_all"] is None for r in failed_cells)

    with transaction(factory) as s:
        repo.mark_running(session=s, sample_id="S2", model_version="cnn:1")
        repo.mark_failed(session=s, sample_id="S2", model_version="cnn:1", error="S3 unreachable after 5 tries")
    (failed,) = results(factory, sample_ids="S2")
    assert failed["status"] == "failed"
    assert failed["error"] == "S3 unreachable after 5 tries"
    assert failed["finished_at"] is not None and failed["n_cells"] is None
    assert cells_of(factory, "S2") == []
    with transaction(factory) as s:
        assert repo.get_sample_status(session=s, sample_id="S2", model_version="cnn:1") == "failed"
        assert repo.get_sample_status(session=s, sample_id="S3", model_version="cnn:1") is None


def scenario_resubmit(factory: Factory) -> None:
    """Same sample+version replaces its result; another version adds a second result set."""
    submit(factory, "job-a", ["S1"])
    first = make_cells("s3://lab/S1", [0.9, 0.8, 0.1])
    score(factory, "S1", "cnn:1", first)
    score(factory, "S1", "cnn:1", first)  # a redelivered task writes the same result again
    assert len(cells_of(factory, "S1")) == len(first)

    with transaction(factory) as s:
        pk_before = s.execute(select(Sample.id).where(Sample.sample_id == "S1")).scalar_one()
        repo.create_job(session=s, job_id="job-b", n_samples=1)
        again = repo.enqueue_sample(session=s, job_id="job-b", sample_id="S1", model_version="cnn:1")
    assert (again.pk, again.submission) == (pk_before, 2)
    (requeued,) = results(factory, sample_ids=["S1"])
    assert (requeued["status"], requeued["job_id"], requeued["n_cells"]) == ("queued", "job-b", None)
    assert cells_of(factory, "S1") == [], "a queued sample must not show the previous result's cells"

    # The new set shares one image with the old one and drops two.
    second = make_cells("s3://lab/S1", [0.3, 0.6]) + make_cells("s3://lab/S1-extra", [0.95])
    score(factory, "S1", "cnn:1", second)
    rows = results(factory, sample_ids=["S1"])
    assert len(rows) == 1
    assert rows[0]["n_cells"] == len(second)
    assert cell_set(cells_of(factory, "S1")) == as_rows(second)

    submit(factory, "job-c", ["S1"], model_version="cnn:2")
    other = make_cells("s3://lab/S1", [0.1, 0.1, 0.1, 0.9])
    score(factory, "S1", "cnn:2", other)
    rows = results(factory, sample_ids=["S1"])
    assert [(r["model_version"], r["n_cells"]) for r in rows] == [
        ("cnn:1", len(second)),
        ("cnn:2", len(other)),
    ]
    assert len(cells_of(factory, "S1")) == len(second) + len(other)
    assert cell_set(cells_of(factory, "S1", "cnn:2")) == as_rows(other)
    assert cell_set(cells_of(factory, "S1", "cnn:1")) == as_rows(second)


def scenario_no_commit(factory: Factory) -> None:
    """A rollback after every repository function leaves the database as it was."""
    before = table_counts(factory)
    with factory() as s:
        repo.ensure_model(
            session=s, name="cnn", version="1", uri="s3://m/cnn/1", sha256="a" * 64,
            sensitivity=0.9, specificity=0.8, threshold=0.5,
        )  # fmt: skip
        repo.create_job(session=s, job_id="job-x", n_samples=1)
        repo.enqueue_sample(session=s, job_id="job-x", sample_id="S9", model_version="cnn:1")
        repo.mark_running(session=s, sample_id="S9", model_version="cnn:1")
        cells = make_cells("s3://lab/S9", [0.9, None])
        repo.record_sample_result(
            session=s, sample_id="S9", model_version="cnn:1", cells=cells, summary=summarize(cells)
        )
        assert len(repo.get_cell_results(session=s, sample_id="S9")) == 2, "visible inside the transaction"
        s.rollback()
    assert table_counts(factory) == before
    assert results(factory, sample_ids=["S9"]) == []
    assert cells_of(factory, "S9") == []


def scenario_errors(factory: Factory) -> None:
    """Mistakes a caller can make get typed errors, and the transaction stays usable after them."""
    with transaction(factory) as s:
        repo.create_job(session=s, job_id="job-e", n_samples=1)
        with pytest.raises(JobExistsError, match="job-e"):
            repo.create_job(session=s, job_id="job-e", n_samples=1)
        with pytest.raises(JobNotFoundError, match="nope"):
            repo.enqueue_sample(session=s, job_id="nope", sample_id="S1", model_version="cnn:1")
        with pytest.raises(SampleNotFoundError, match="ghost"):
            repo.mark_running(session=s, sample_id="ghost", model_version="cnn:1")
        with pytest.raises(SampleNotFoundError, match="ghost"):
            repo.mark_failed(session=s, sample_id="ghost", model_version="cnn:1", error="x")
        for bad in ("", "x" * 129, "bad\nid", "tab\tid", " padded"):
            with pytest.raises(InvalidIdentifierError):
                repo.enqueue_sample(session=s, job_id="job-e", sample_id=bad, model_version="cnn:1")
        repo.enqueue_sample(session=s, job_id="job-e", sample_id="x" * 128, model_version="cnn:1")

        repo.enqueue_sample(session=s, job_id="job-e", sample_id="S1", model_version="cnn:1")
        cells = make_cells("s3://lab/S1", [0.9, None])
        with pytest.raises(ResultMismatchError, match="n_cells"):
            repo.record_sample_result(
                session=s, sample_id="S1", model_version="cnn:1", cells=cells[:1], summary=summarize(cells)
            )
        with pytest.raises(ResultMismatchError, match="twice"):
            doubled = [cells[0], cells[0]]
            repo.record_sample_result(
                session=s, sample_id="S1", model_version="cnn:1", cells=doubled, summary=summarize(doubled)
            )

        kwargs = {"uri": "s3://m/cnn/1", "sensitivity": 0.9, "specificity": 0.8, "threshold": 0.5}
        model_id = repo.ensure_model(session=s, name="cnn", version="1", sha256="a" * 64, **kwargs)  # type: ignore[arg-type]
        assert repo.ensure_model(session=s, name="cnn", version="1", sha256="a" * 64, **kwargs) == model_id  # type: ignore[arg-type]
        assert repo.ensure_model(session=s, name="cnn", version="2", sha256="b" * 64, **kwargs) != model_id  # type: ignore[arg-type]
        with pytest.raises(ModelConflictError, match="cnn:1"):
            repo.ensure_model(session=s, name="cnn", version="1", sha256="c" * 64, **kwargs)  # type: ignore[arg-type]
    # Everything that did not raise was committed: the errors did not poison the transaction.
    assert {r["sample_id"] for r in results(factory, job_id="job-e")} == {"S1", "x" * 128}
    assert table_counts(factory)["models"] == 2


def models_match_migrations(engine: Engine) -> list[object]:
    """Differences between db/models.py and the migrated schema, as Alembic's autogenerate sees them."""
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))


# --- SQLite ------------------------------------------------------------------------------------------------


@pytest.fixture
def url(tmp_path: Path) -> str:
    """A migrated SQLite database in a folder that does not exist yet."""
    url = f"sqlite:///{tmp_path / 'nested' / 'allscore.db'}"
    upgrade(url)
    return url


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def factory(engine: Engine) -> Factory:
    return session_factory(engine)


def test_upgrade_creates_tables_and_the_contract_views(url: str, engine: Engine) -> None:
    inspector = inspect(engine)
    assert set(inspector.get_table_names()) >= TABLES
    assert set(inspector.get_view_names()) == {"sample_results", "cell_results", "sample_reviews"}
    assert [c["name"] for c in inspector.get_columns("sample_results")] == SAMPLE_RESULTS_COLUMNS
    assert [c["name"] for c in inspector.get_columns("cell_results")] == CELL_RESULTS_COLUMNS
    assert current_revision(url) == head_revision()


def test_upgrade_is_idempotent_and_revision_is_none_before(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert current_revision(url) is None
    upgrade(url)
    upgrade(url)
    assert current_revision(url) == head_revision()


def test_models_match_migrations(engine: Engine) -> None:
    assert models_match_migrations(engine) == []


def test_downgrade_to_base_and_back(url: str, engine: Engine) -> None:
    with engine.begin() as conn:
        config = alembic_config()
        config.attributes["connection"] = conn
        command.downgrade(config, "base")
    inspector = inspect(engine)
    assert not TABLES & set(inspector.get_table_names())
    assert inspector.get_view_names() == []
    upgrade(url)
    assert current_revision(url) == head_revision()


def test_concurrent_upgrades_of_one_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'race.db'}"
    errors = run_concurrently([lambda: upgrade(url)] * 3)
    assert errors == []
    assert current_revision(url) == head_revision()


def run_concurrently(jobs: list[Callable[[], None]], timeout_s: float = 60.0) -> list[BaseException]:
    """Start all jobs at once on threads; return the exceptions they raised."""
    barrier = threading.Barrier(len(jobs))
    errors: list[BaseException] = []

    def run(job: Callable[[], None]) -> None:
        barrier.wait()
        try:
            job()
        except Exception as exc:  # noqa: BLE001 -- a thread's error, returned to the caller to assert on
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,), daemon=True) for job in jobs]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = sum(t.is_alive() for t in threads)
    if stuck:
        errors.append(TimeoutError(f"{stuck} of {len(jobs)} jobs still running after {timeout_s} s"))
    return errors


def test_flow(factory: Factory) -> None:
    scenario_flow(factory)


def test_resubmit_replaces_and_new_version_adds(factory: Factory) -> None:
    scenario_resubmit(factory)


def test_repository_functions_do_not_commit(factory: Factory) -> None:
    scenario_no_commit(factory)


def test_errors(factory: Factory) -> None:
    scenario_errors(factory)


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


def test_sqlite_engine_settings(engine: Engine, url: str) -> None:
    assert Path(parse_url(url).database or "").is_file(), "the missing parent folder was created"
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


def test_url_parsing() -> None:
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


def test_records_refuse_impossible_values() -> None:
    with pytest.raises(ValueError, match="exceeds n_cells"):
        SampleSummary(2, 2, 1, 1.0, 0.5, 1.0, None, 0.9)
    with pytest.raises(ValueError, match="p_all"):
        CellResult("a.bmp", math.nan, None)
    with pytest.raises(ValueError, match="all_fraction"):
        SampleSummary(2, 1, 0, 1.5, 0.5, 1.0, None, 0.9)
    with pytest.raises(ValueError, match="flag"):
        SampleSummary(2, 1, 0, 0.5, 0.1, 0.9, None, 0.5, flags=("a,b",))
