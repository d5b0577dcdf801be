"""Thin Celery tasks: check the message, hand it to the engine, retry transient faults, record failures."""

from __future__ import annotations

import logging
import random
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError, OperationalError

from core.errors import AllscoreError
from core.storage import StorageUnavailable
from db import repository
from db.engine import transaction
from worker.celery_app import TASK_NAME, app
from worker.context import get_context
from worker.engine import score_sample
from worker.messages import InvalidMessage, parse_message

log = logging.getLogger(__name__)

# Faults that pass: the database, the object store or the network being away for a while.
TRANSIENT: tuple[type[BaseException], ...] = (
    StorageUnavailable,
    OperationalError,
    ConnectionError,
    TimeoutError,
)


def backoff(retries: int, base: float = 2.0, cap: float = 120.0) -> float:
    """Exponential backoff with full jitter, in seconds."""
    return random.uniform(0, min(cap, base * 2**retries))


def _mark_failed(sample_id: str, model_version: str, reason: str) -> bool:
    """Record the sample as failed; False when the database is unreachable, so nothing could be recorded."""
    try:
        with transaction(get_context().sessions) as session:
            repository.mark_failed(session=session, sample_id=sample_id, model_version=model_version, error=reason)
    except OperationalError as exc:
        log.error("could not mark sample %s failed (%s): the database is unreachable: %s", sample_id, reason, exc)
        return False
    except (DBAPIError, AllscoreError) as exc:
        log.error("could not mark sample %s failed (%s): %s", sample_id, reason, exc)
    return True


# max_retries=None: no limit by default; transient faults pass settings.task_max_retries explicitly.
@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def score_sample_task(self: Task, *args: Any, **kwargs: Any) -> None:
    """Score one sample: {job_id, sample_id, image_uris, model_ref}."""
    try:
        request = parse_message(args, kwargs)
    except InvalidMessage as exc:
        # Not retried and not run: a malformed message is logged and dropped (acked).
        log.error("rejected message %s: %s", self.request.id, exc)
        return
    ctx = get_context()
    settings = ctx.settings
    model_version = request.model_ref

    def fail(reason: str) -> None:
        if _mark_failed(request.sample_id, model_version, reason):
            return
        # Acking now would leave the sample `running` with nothing left on the queue to finish it: keep the
        # message, past task_max_retries, until the database is back to take the result or the failure.
        delay = settings.task_retry_backoff_max
        log.warning("sample %s: database unreachable; retry in %.1fs", request.sample_id, delay)
        raise self.retry(countdown=delay)

    try:
        loaded = ctx.model(request.model_ref)
        model_version = loaded.manifest.ref
        score_sample(
            request,
            loaded=loaded,
            fetch=ctx.fetch,
            sessions=ctx.sessions,
            pool=ctx.pool,
            batch_size=settings.batch_size,
            flag_thresholds=settings.flag_thresholds,
            max_pixels=settings.max_image_pixels,
        )
    except TRANSIENT as exc:
        retries = self.request.retries
        if retries >= settings.task_max_retries:
            fail(f"gave up after {retries} retries: {exc}")
            return
        delay = backoff(retries, settings.task_retry_backoff, settings.task_retry_backoff_max)
        log.warning("sample %s: transient fault (%s); retry %d in %.1fs", request.sample_id, exc, retries + 1, delay)
        raise self.retry(exc=exc, countdown=delay, max_retries=settings.task_max_retries) from exc
    except SoftTimeLimitExceeded:
        fail("time limit exceeded: split the sample or raise the limit")
    except AllscoreError as exc:
        fail(str(exc))
