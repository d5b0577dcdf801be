"""Database helpers shared by the tests: the analysts' contract written out, what a client and a worker write,
reading the views back, running things at once, and the roles' refusals."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, func, inspect, select, text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from core.contract import CellResult, SampleSummary
from db import repository as repo
from db.engine import parse_url, transaction
from db.migrate import current_revision, head_revision
from db.models import Base, Cell, Job, Model, Sample

Factory = sessionmaker[Session]

# The analyst contract, written out here (not derived from the code) so that a change to it fails a test. Columns
# are only ever added at the end: the fields' columns (from `kind` and from `field_uri`) came with migration 0004.
# fmt: off
SAMPLE_RESULTS_COLUMNS = [
    "sample_id", "job_id", "status", "model_version", "n_cells", "n_all", "n_failed", "all_fraction", "ci_low",
    "ci_high", "corrected_fraction", "mean_p_all", "flags", "submitted_at", "started_at", "finished_at", "error",
    "kind", "n_fields", "n_fields_failed", "n_other", "n_edge", "um_per_px", "scale_source",
]
CELL_RESULTS_COLUMNS = [
    "sample_id", "image_uri", "p_all", "is_all", "error", "model_version", "scored_at",
    "field_uri", "cell_index", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1", "centroid_x", "centroid_y", "area_um2",
    "cell_kind", "edge", "um_per_px", "scale_source", "outline",
]
# fmt: on
TABLES = {"models", "jobs", "samples", "cells", "sample_fields", "review_users", "cell_verdicts", "sample_signoffs"}
VIEWS = {"sample_results", "cell_results", "field_results", "sample_reviews"}

# PostgreSQL's SQLSTATE for a statement a role may not run.
INSUFFICIENT_PRIVILEGE = "42501"


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
    """The (image_uri, p_all, is_all, error) of view rows, for set comparison."""
    return {(r["image_uri"], r["p_all"], r["is_all"], r["error"]) for r in rows}


def as_rows(cells: list[CellResult]) -> set[tuple[object, ...]]:
    """The same tuple shape as cell_set, from the records handed in."""
    return {(c.image_uri, c.p_all, c.is_all, c.error) for c in cells}


def register_model(session: Session, name: str = "cnn", version: str = "1", sha256: str = "a" * 64) -> int:
    """Register a model as the submit client does (threshold 0.5, sensitivity 0.9, specificity 0.8)."""
    return repo.ensure_model(
        session=session, name=name, version=version, uri=f"s3://m/{name}/{version}", sha256=sha256,
        sensitivity=0.9, specificity=0.8, threshold=0.5,
    )  # fmt: skip


def submit(factory: Factory, job_id: str, sample_ids: list[str], model_version: str = "cnn:1") -> dict[str, int]:
    """What the submit client does: a job and its queued samples in one transaction; returns their submissions."""
    with transaction(factory) as s:
        repo.create_job(session=s, job_id=job_id, n_samples=len(sample_ids))
        return {
            sample_id: repo.enqueue_sample(
                session=s, job_id=job_id, sample_id=sample_id, model_version=model_version
            ).submission
            for sample_id in sample_ids
        }


def score(factory: Factory, sample_id: str, model_version: str, cells: list[CellResult]) -> None:
    """What a worker does for one sample: running, then the result, each in its own transaction."""
    with transaction(factory) as s:
        repo.mark_running(session=s, sample_id=sample_id, model_version=model_version)
    with transaction(factory) as s:
        repo.record_sample_result(
            session=s, sample_id=sample_id, model_version=model_version, cells=cells, summary=summarize(cells)
        )


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


def models_match_migrations(engine: Engine) -> list[object]:
    """Differences between db/models.py and the migrated schema, as Alembic's autogenerate sees them."""
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))


def assert_migrated_to_head(engine: Engine, url: str) -> None:
    """The database at `url` is at the head revision: every table, exactly the views, the analysts' columns in their
    order, and nothing that differs from db/models.py."""
    inspector = inspect(engine)
    assert set(inspector.get_table_names()) >= TABLES
    assert set(inspector.get_view_names()) == VIEWS
    assert [c["name"] for c in inspector.get_columns("sample_results")] == SAMPLE_RESULTS_COLUMNS
    assert [c["name"] for c in inspector.get_columns("cell_results")] == CELL_RESULTS_COLUMNS
    assert current_revision(url) == head_revision()
    assert models_match_migrations(engine) == []


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


def role_engine(url: str, username: str, password: str | None = None) -> Engine:
    """An engine on the same database as `url`, logged in as another role, with that role's own settings (none of
    the timeouts make_engine adds, so a role's configured statement_timeout shows)."""
    return create_engine(parse_url(url).set(username=username, password=password))


def assert_denied(engine: Engine, statements: Iterable[str]) -> None:
    """Each statement, run in its own transaction, fails with PostgreSQL's insufficient privilege."""
    for statement in statements:
        with pytest.raises(ProgrammingError) as caught, engine.begin() as conn:
            conn.execute(text(statement))
        assert getattr(caught.value.orig, "sqlstate", None) == INSUFFICIENT_PRIVILEGE, statement
