"""Completion callbacks (migration 0009): claiming a job's callback once, recording what came of it, and the jobs
the sweeper still has to send. Every function takes a keyword-only session and never commits, as in
db.repository; updates never synchronise loaded objects (these functions load none)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import Session

from db.coltypes import utcnow
from db.models import Job, Sample, SampleStatus

# A claim still `sending` this long after it was made belongs to a process that died while sending (its tries take
# at most ALLSCORE_NOTIFY_ATTEMPTS x ALLSCORE_NOTIFY_TIMEOUT plus the backoff, about a minute by default): the
# callback may be claimed again, by the sweeper.
NOTIFY_CLAIM_STALE = timedelta(minutes=15)


def _claimable(now: datetime) -> Any:
    return or_(
        Job.notified_at.is_(None),
        and_(Job.notify_status == "sending", Job.notified_at < now - NOTIFY_CLAIM_STALE),
    )


def claim_notification(*, session: Session, job_id: str) -> str | None:
    """The job's callback URL if this caller is the one to send it: the job asked for one, every one of its samples
    has ended, and nobody claimed it before (the claim is one conditional UPDATE: two workers ending the last two
    samples at once cannot both win) or the claim was left `sending` by a process that died. None otherwise."""
    now = utcnow()
    unfinished = exists().where(Sample.job_id == job_id, Sample.status.in_([SampleStatus.QUEUED, SampleStatus.RUNNING]))
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.notify_url.is_not(None), _claimable(now), ~unfinished)
        .values(notified_at=now, notify_status="sending")
        .returning(Job.notify_url)
        .execution_options(synchronize_session=False)
    )
    url = session.execute(stmt).scalar_one_or_none()
    return None if url is None else str(url)


def record_notification(*, session: Session, job_id: str, status: str) -> None:
    """What came of the job's callback (delivered, or why not)."""
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(notify_status=status[:2000])
        .execution_options(synchronize_session=False)
    )


def jobs_to_notify(*, session: Session) -> list[str]:
    """Jobs that asked for a callback, not yet claimed (or left `sending` by a process that died), whose samples have
    all ended (the sweeper sends these: samples ended by `allscore cancel` or by the sweeper itself)."""
    unfinished = exists().where(Sample.job_id == Job.id, Sample.status.in_([SampleStatus.QUEUED, SampleStatus.RUNNING]))
    stmt = select(Job.id).where(Job.notify_url.is_not(None), _claimable(utcnow()), ~unfinished)
    return [str(job_id) for job_id in session.execute(stmt).scalars()]


def job_summary(*, session: Session, job_id: str) -> list[dict[str, Any]]:
    """The job's samples as a callback reports them (read from samples: the worker's role has no views)."""
    stmt = (
        select(
            Sample.sample_id,
            Sample.model_version,
            Sample.status,
            Sample.n_cells,
            Sample.n_all,
            Sample.n_failed,
            Sample.all_fraction,
            Sample.ci_low,
            Sample.ci_high,
            Sample.corrected_fraction,
            Sample.flags,
            Sample.error,
            Sample.finished_at,
        )
        .where(Sample.job_id == job_id)
        .order_by(Sample.sample_id, Sample.model_version)
    )
    rows = []
    for row in session.execute(stmt):
        item = dict(row._mapping)
        item["status"] = str(getattr(item["status"], "value", item["status"]))
        item["finished_at"] = item["finished_at"].isoformat() if item["finished_at"] is not None else None
        rows.append(item)
    return rows
