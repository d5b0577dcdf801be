"""The sweeper: samples that no worker will ever finish are failed with the reason, so none waits forever.

Two ways a sample can be left behind although every task ends it:

- `running` long past the hard time limit: the process that ran it is gone and its message with it (a Redis
  flushed or restarted without persistence took the unacknowledged copy);
- `queued` with no message on the broker: the message was lost before any worker took it.

`allscore sweep` looks once (compose runs it every few minutes as the `sweeper` service). A queued sample is only
judged once it is older than a grace period, so a submit in flight is never swept. The broker is read without
consuming anything: Redis's queue list and kombu's hash of unacknowledged messages.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from core.settings import Settings
from db import notifications, repository
from db.engine import make_engine, session_factory, transaction
from db.errors import StaleDelivery
from db.models import Sample, SampleStatus

log = logging.getLogger(__name__)

# Margin past the hard time limit before a running sample is taken to be abandoned.
RUNNING_MARGIN = timedelta(minutes=10)
# A queued sample younger than this is left alone (its submit may still be sending the message).
QUEUED_GRACE = timedelta(minutes=2)


@dataclass
class SweepReport:
    """What one sweep found and did."""

    stuck_running: list[str] = field(default_factory=list)
    lost_queued: list[str] = field(default_factory=list)
    broker_checked: bool = False
    notified: list[str] = field(default_factory=list)  # jobs whose callbacks this sweep sent

    def describe(self) -> str:
        parts = [f"{len(self.stuck_running)} running past the hard time limit"]
        if self.broker_checked:
            parts.append(f"{len(self.lost_queued)} queued with no message on the broker")
        else:
            parts.append("queued samples not checked (the broker is not Redis)")
        return "swept: " + ", ".join(parts)


def _task_kwargs(raw: bytes | str) -> dict[str, Any] | None:
    """The keyword arguments of one kombu message on Redis (protocol 2: body = [args, kwargs, embed])."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):  # the unacked hash holds [message, exchange, routing_key]
            message = message[0]
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        payload = json.loads(body)
        kwargs = payload[1] if isinstance(payload, list) else payload.get("kwargs", {})
        return kwargs if isinstance(kwargs, dict) else None
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def messages_on_broker(settings: Settings) -> set[tuple[str, str, int | None]] | None:
    """(job_id, sample_id, submission) of every score message queued or unacked on Redis; None if not Redis."""
    if not settings.broker_url.startswith(("redis://", "rediss://")):
        return None
    import redis

    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, socket_timeout=30)
    try:
        raws: list[Any] = [*client.lrange(settings.queue, 0, -1), *client.hvals("unacked")]
        found = set()
        for raw in raws:
            kwargs = _task_kwargs(raw)
            if kwargs and "sample_id" in kwargs:
                found.add((str(kwargs.get("job_id")), str(kwargs["sample_id"]), kwargs.get("submission")))
        return found
    finally:
        client.close()


def sweep(settings: Settings, *, now: datetime | None = None, dry_run: bool = False) -> SweepReport:
    """Fail the samples no worker will finish (see the module docstring); returns what was found."""
    now = now or datetime.now(UTC)
    report = SweepReport()
    running_cutoff = now - timedelta(seconds=settings.task_time_limit) - RUNNING_MARGIN
    on_broker = messages_on_broker(settings)
    report.broker_checked = on_broker is not None
    if on_broker is not None:
        # A message moves from the queue to the unacked hash in two steps: read twice, so one in between
        # is seen in one of the reads.
        time.sleep(1.0)
        on_broker |= messages_on_broker(settings) or set()
    engine = make_engine(settings.database_url, settings)
    sessions = session_factory(engine)
    try:
        with sessions() as session:
            rows = session.execute(
                select(
                    Sample.sample_id,
                    Sample.model_version,
                    Sample.job_id,
                    Sample.submission,
                    Sample.status,
                    Sample.started_at,
                    Sample.submitted_at,
                ).where(Sample.status.in_([SampleStatus.QUEUED, SampleStatus.RUNNING]))
            ).all()
        for row in rows:
            reason = None
            if row.status == SampleStatus.RUNNING and row.started_at is not None and row.started_at < running_cutoff:
                reason = (
                    f"still running {settings.task_time_limit} s (the hard time limit) plus "
                    f"{int(RUNNING_MARGIN.total_seconds())} s after it started: no worker holds it any more; resubmit"
                )
                report.stuck_running.append(row.sample_id)
            elif (
                on_broker is not None
                and row.status == SampleStatus.QUEUED
                and row.submitted_at < now - QUEUED_GRACE
                and not any(
                    (row.job_id, row.sample_id) == (job, sample) and submission in (row.submission, None)
                    for job, sample, submission in on_broker
                )
            ):
                reason = "its message is no longer on the broker (a flushed or lost Redis); resubmit the sample"
                report.lost_queued.append(row.sample_id)
            if reason is None or dry_run:
                continue
            try:
                with transaction(sessions) as session:
                    repository.mark_failed(
                        session=session,
                        sample_id=row.sample_id,
                        model_version=row.model_version,
                        error=f"swept: {reason}",
                        delivery=repository.Delivery(row.job_id, row.submission),
                        only_if=SampleStatus(row.status),
                    )
            except StaleDelivery:
                continue  # it moved on (started, ended or resubmitted) while we looked: not stuck
            log.warning("swept sample %s (%s): %s", row.sample_id, row.model_version, reason)
        if not dry_run:
            # Jobs whose last samples were cancelled or swept: nobody else will send their callbacks.
            from worker.notify import notify_job

            with sessions() as session:
                due = notifications.jobs_to_notify(session=session)
            for job_id in due:
                if notify_job(job_id, sessions, settings) is not None:
                    report.notified.append(job_id)
    finally:
        engine.dispose()
    return report
