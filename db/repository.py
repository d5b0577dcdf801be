"""Reads and writes of scoring results. Every function takes a keyword-only session and never commits:
the caller owns the transaction (db.engine.transaction)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.contract import CellResult, FieldRecord, SampleSummary
from db.coltypes import utcnow
from db.errors import (
    DatabaseUrlError,
    JobExistsError,
    JobNotFoundError,
    ModelConflictError,
    SampleCancelled,
    SampleNotFoundError,
    StaleDelivery,
)
from db.models import (
    ENDED,
    JOB_ID_MAX_LENGTH,
    MODEL_VERSION_MAX_LENGTH,
    SAMPLE_ID_MAX_LENGTH,
    Cell,
    Job,
    Model,
    Sample,
    SampleFieldRow,
    SampleStatus,
)
from db.rows import NO_SUMMARY, cell_row, check_identifier, check_result, field_row, summary_columns
from db.views import cell_results, field_results, sample_results

# ORM updates here never need to refresh loaded objects: the functions load none.
_NO_SYNC = {"synchronize_session": False}


@dataclass(frozen=True, slots=True)
class Delivery:
    """Who writes: the job and submission of the task message (the fencing token); None = legacy message."""

    job_id: str
    submission: int | None


class Enqueued(NamedTuple):
    """A queued sample row: its primary key and its submission number (the message's fencing token)."""

    pk: int
    submission: int


def _insert(session: Session, entity: type[Any]) -> postgresql.Insert | sqlite.Insert:
    # Both dialects spell an upsert ON CONFLICT, which makes concurrent submitters safe without
    # catching IntegrityError (that would abort the whole PostgreSQL transaction).
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(entity)
    if dialect == "sqlite":
        return sqlite.insert(entity)
    raise DatabaseUrlError(f"database {dialect!r} is not supported; use PostgreSQL or SQLite")


def ensure_model(
    *,
    session: Session,
    name: str,
    version: str,
    uri: str,
    sha256: str,
    sensitivity: float | None,
    specificity: float | None,
    threshold: float,
) -> int:
    """Register model `name:version` unless it is already; return its id."""
    stmt = (
        _insert(session, Model)
        .values(
            name=name,
            version=version,
            uri=uri,
            sha256=sha256,
            sensitivity=sensitivity,
            specificity=specificity,
            threshold=threshold,
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["name", "version"])
        .returning(Model.id)
    )
    new_id = session.execute(stmt).scalar_one_or_none()
    if new_id is not None:
        return int(new_id)
    existing = session.execute(select(Model.id, Model.sha256).where(Model.name == name, Model.version == version)).one()
    if existing.sha256 != sha256:
        raise ModelConflictError(
            f"model {name}:{version} is registered with sha256 {existing.sha256}, not {sha256}; a version "
            "is immutable: publish the changed model as a new version"
        )
    return int(existing.id)


def create_job(
    *,
    session: Session,
    job_id: str,
    n_samples: int,
    retry_of: Sequence[tuple[str, str]] | None = None,
    notify_url: str | None = None,
) -> None:
    """Create job `job_id` for `n_samples` samples; raise JobExistsError if the id is taken.

    `retry_of`, the job's (sample_id, model_version) pairs: a job that exists with exactly these samples is a
    retry of the same submission (one that failed part way) and is taken again instead of refused.
    """
    check_identifier("job id", job_id, JOB_ID_MAX_LENGTH)
    if n_samples < 0:
        raise ValueError(f"job {job_id!r}: n_samples must be non-negative, got {n_samples}")
    stmt = (
        _insert(session, Job)
        .values(id=job_id, submitted_at=utcnow(), n_samples=n_samples, notify_url=notify_url)
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(Job.id)
    )
    if session.execute(stmt).scalar_one_or_none() is not None:
        return
    if retry_of is not None:
        existing = session.execute(select(Sample.sample_id, Sample.model_version).where(Sample.job_id == job_id))
        if {(row.sample_id, row.model_version) for row in existing} == set(retry_of):
            # A retry is a new chance to be told when it ends.
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(notify_url=notify_url, notified_at=None, notify_status=None)
                .execution_options(**_NO_SYNC)
            )
            return
    raise JobExistsError(
        f"job {job_id!r} exists already with other samples; submit under a new job id (or let one be made); "
        "resubmitting exactly the same samples under the same job id retries that job"
    )


def enqueue_sample(
    *, session: Session, job_id: str, sample_id: str, model_version: str, kind: str = "cells"
) -> Enqueued:
    """Queue `sample_id` for `model_version` under `job_id`; a resubmission resets the row.

    Resubmitting the same (sample_id, model_version) clears the previous result and its cells, so a
    queued sample never shows stale numbers, and bumps its submission number, so deliveries of the old
    submission can no longer write; another model version is a separate result set.
    """
    check_identifier("sample id", sample_id, SAMPLE_ID_MAX_LENGTH)
    check_identifier("model version", model_version, MODEL_VERSION_MAX_LENGTH)
    if session.execute(select(Job.id).where(Job.id == job_id)).first() is None:
        raise JobNotFoundError(f"job {job_id!r} does not exist; create it (create_job) before its samples")
    fresh: dict[str, Any] = {
        **NO_SUMMARY,
        "job_id": job_id,
        "status": SampleStatus.QUEUED,
        "submitted_at": utcnow(),
        "started_at": None,
        "finished_at": None,
        "error": None,
        "attempts": 0,
        "kind": kind,
    }
    stmt = (
        _insert(session, Sample)
        .values(sample_id=sample_id, model_version=model_version, submission=1, **fresh)
        .on_conflict_do_update(
            index_elements=["sample_id", "model_version"], set_={**fresh, "submission": Sample.submission + 1}
        )
        .returning(Sample.id, Sample.submission)
    )
    row = session.execute(stmt).one()
    pk = int(row.id)
    _clear_results(session, pk)
    return Enqueued(pk, int(row.submission))


def _clear_results(session: Session, sample_pk: int) -> None:
    """Delete a sample's cell rows and field rows (a result is replaced or cleared whole, never left half-valid)."""
    session.execute(delete(Cell).where(Cell.sample_pk == sample_pk).execution_options(**_NO_SYNC))
    session.execute(delete(SampleFieldRow).where(SampleFieldRow.sample_pk == sample_pk).execution_options(**_NO_SYNC))


def _not_found(sample_id: str, model_version: str) -> SampleNotFoundError:
    return SampleNotFoundError(
        f"no sample {sample_id!r} for model {model_version!r}; it must be submitted (enqueue_sample) first"
    )


def _lock_sample(session: Session, sample_id: str, model_version: str, delivery: Delivery | None = None) -> Any:
    # FOR UPDATE serializes two deliveries of one sample on PostgreSQL (SQLite: BEGIN IMMEDIATE
    # already does), so the fence below is checked and the write made in one transaction.
    row = session.execute(
        select(Sample.id, Sample.started_at, Sample.job_id, Sample.submission, Sample.status)
        .where(Sample.sample_id == sample_id, Sample.model_version == model_version)
        .with_for_update()
    ).one_or_none()
    if row is None:
        raise _not_found(sample_id, model_version)
    if delivery is not None:
        _check_fence(row, sample_id, model_version, delivery)
    return row


def _check_fence(row: Any, sample_id: str, model_version: str, delivery: Delivery) -> None:
    where = f"sample {sample_id!r} (model {model_version!r})"
    if row.job_id != delivery.job_id or (delivery.submission is not None and row.submission != delivery.submission):
        raise StaleDelivery(
            f"{where}: this delivery (job {delivery.job_id!r}, submission {delivery.submission}) was superseded by "
            f"job {row.job_id!r}, submission {row.submission}; it writes nothing"
        )
    if row.status == SampleStatus.CANCELLED:
        raise SampleCancelled(f"{where}: cancelled; this delivery stops and writes nothing")
    if row.status in ENDED:
        raise StaleDelivery(f"{where}: already {row.status} for this submission; a repeated delivery writes nothing")


def check_current(*, session: Session, sample_id: str, model_version: str, delivery: Delivery) -> None:
    """Raise SampleCancelled if the sample was cancelled, StaleDelivery if this delivery no longer owns it (read
    without a lock: a running sample asks this between batches, to stop early; its final write is fenced anyway)."""
    row = session.execute(
        select(Sample.job_id, Sample.submission, Sample.status).where(
            Sample.sample_id == sample_id, Sample.model_version == model_version
        )
    ).one_or_none()
    if row is None:
        raise _not_found(sample_id, model_version)
    owned = row.job_id == delivery.job_id and delivery.submission in (None, row.submission)
    if row.status == SampleStatus.RUNNING and owned:
        return
    _check_fence(row, sample_id, model_version, delivery)


def get_sample_status(*, session: Session, sample_id: str, model_version: str) -> SampleStatus | None:
    """The status of (sample_id, model_version), or None if it was never submitted."""
    status = session.execute(
        select(Sample.status).where(Sample.sample_id == sample_id, Sample.model_version == model_version)
    ).scalar_one_or_none()
    return None if status is None else SampleStatus(status)


def mark_running(*, session: Session, sample_id: str, model_version: str, delivery: Delivery | None = None) -> int:
    """Mark the sample running now; return how many times a worker has started it (1 on the first).

    With a `delivery`, raise StaleDelivery unless it is the sample's current, unfinished submission.
    """
    if delivery is not None:
        _lock_sample(session, sample_id, model_version, delivery)
    stmt = (
        update(Sample)
        .where(Sample.sample_id == sample_id, Sample.model_version == model_version)
        .values(
            status=SampleStatus.RUNNING,
            started_at=utcnow(),
            finished_at=None,
            error=None,
            attempts=Sample.attempts + 1,
        )
        .returning(Sample.attempts)
        .execution_options(**_NO_SYNC)
    )
    attempts = session.execute(stmt).scalar_one_or_none()
    if attempts is None:
        raise _not_found(sample_id, model_version)
    return int(attempts)


def record_sample_result(
    *,
    session: Session,
    sample_id: str,
    model_version: str,
    cells: Sequence[CellResult],
    summary: SampleSummary,
    delivery: Delivery | None = None,
    fields: Sequence[FieldRecord] = (),
) -> None:
    """Replace the sample's cell rows with `cells` (one bulk insert) and its field rows with `fields` (field samples),
    and mark it done with `summary`.

    With a `delivery`, nothing is written (StaleDelivery) unless it is the current, unfinished submission.
    """
    check_result(sample_id, model_version, cells, summary)
    sample = _lock_sample(session, sample_id, model_version, delivery)
    now = utcnow()
    _clear_results(session, sample.id)
    if cells:
        # Single-cell samples leave the field columns out of the insert (NULL by default): 14 more bound NULLs a
        # row halved the rows per second into PostgreSQL (make bench run 13).
        with_field = any(cell.field is not None for cell in cells)
        session.execute(
            insert(Cell),
            [cell_row(sample.id, cell, now, with_field) for cell in cells],
        )
    if fields:
        session.execute(insert(SampleFieldRow), [field_row(sample.id, f) for f in fields])
    session.execute(
        update(Sample)
        .where(Sample.id == sample.id)
        .values(
            status=SampleStatus.DONE,
            **summary_columns(summary),
            started_at=sample.started_at or now,
            finished_at=now,
            error=None,
        )
        .execution_options(**_NO_SYNC)
    )


def mark_failed(
    *,
    session: Session,
    sample_id: str,
    model_version: str,
    error: str,
    delivery: Delivery | None = None,
    only_if: SampleStatus | None = None,
) -> None:
    """Mark the sample failed with `error`; any earlier result of it is cleared, never left half-valid.

    With a `delivery`, nothing is written (StaleDelivery) unless it is the current, unfinished submission; with
    `only_if`, nothing is written (StaleDelivery) unless the sample is still in that status.
    """
    sample = _lock_sample(session, sample_id, model_version, delivery)
    if only_if is not None and sample.status != only_if:
        raise StaleDelivery(f"sample {sample_id!r} (model {model_version!r}) is {sample.status}, not {only_if}")
    _clear_results(session, sample.id)
    session.execute(
        update(Sample)
        .where(Sample.id == sample.id)
        .values(**NO_SUMMARY, status=SampleStatus.FAILED, error=error, finished_at=utcnow())
        .execution_options(**_NO_SYNC)
    )


@dataclass(frozen=True, slots=True)
class Cancelled:
    """A sample that cancel_samples ended: which one, and the status it had."""

    sample_id: str
    model_version: str
    job_id: str
    was: str


def cancel_samples(
    *,
    session: Session,
    sample_ids: Sequence[str] | None = None,
    job_id: str | None = None,
    reason: str = "cancelled",
) -> list[Cancelled]:
    """End the queued and running samples named (by sample id, and/or by job) as `cancelled`.

    A queued one is never run (its delivery finds it ended and writes nothing); a running one stops before its
    next batch and writes nothing (worker.engine's check). Samples that have ended already are left as they are.
    """
    if sample_ids is None and job_id is None:
        raise ValueError("cancel_samples needs sample ids or a job id")
    stmt = select(Sample.id, Sample.sample_id, Sample.model_version, Sample.job_id, Sample.status).where(
        Sample.status.in_([SampleStatus.QUEUED, SampleStatus.RUNNING])
    )
    if sample_ids is not None:
        stmt = stmt.where(Sample.sample_id.in_(list(sample_ids)))
    if job_id is not None:
        stmt = stmt.where(Sample.job_id == job_id)
    rows = session.execute(stmt.order_by(Sample.sample_id, Sample.model_version).with_for_update()).all()
    now = utcnow()
    for row in rows:
        _clear_results(session, row.id)
        session.execute(
            update(Sample)
            .where(Sample.id == row.id)
            .values(**NO_SUMMARY, status=SampleStatus.CANCELLED, error=reason, finished_at=now)
            .execution_options(**_NO_SYNC)
        )
    return [Cancelled(r.sample_id, r.model_version, r.job_id, str(SampleStatus(r.status))) for r in rows]


def get_sample_results(
    *, session: Session, sample_ids: Sequence[str] | None = None, job_id: str | None = None
) -> list[dict[str, Any]]:
    """Rows of the view sample_results, optionally for some sample ids and/or one job."""
    stmt = select(sample_results)
    if sample_ids is not None:
        ids = [sample_ids] if isinstance(sample_ids, str) else list(sample_ids)
        stmt = stmt.where(sample_results.c.sample_id.in_(ids))
    if job_id is not None:
        stmt = stmt.where(sample_results.c.job_id == job_id)
    stmt = stmt.order_by(sample_results.c.sample_id, sample_results.c.model_version)
    return [dict(row._mapping) for row in session.execute(stmt)]


def get_cell_results(*, session: Session, sample_id: str, model_version: str | None = None) -> list[dict[str, Any]]:
    """Rows of the view cell_results for one sample, optionally one model version."""
    stmt = select(cell_results).where(cell_results.c.sample_id == sample_id)
    if model_version is not None:
        stmt = stmt.where(cell_results.c.model_version == model_version)
    stmt = stmt.order_by(cell_results.c.model_version, cell_results.c.image_uri)
    return [dict(row._mapping) for row in session.execute(stmt)]


def get_field_results(*, session: Session, sample_id: str, model_version: str | None = None) -> list[dict[str, Any]]:
    """Rows of the view field_results for one sample (field samples; optionally one model version), in the order
    the fields were submitted."""
    stmt = select(field_results).where(field_results.c.sample_id == sample_id)
    if model_version is not None:
        stmt = stmt.where(field_results.c.model_version == model_version)
    stmt = stmt.order_by(field_results.c.model_version, field_results.c.field_index)
    return [dict(row._mapping) for row in session.execute(stmt)]
