"""Thin Celery tasks: check the message, hand it to the engine, retry transient faults, record failures.

Every sample ends `done` or `failed`: a transient fault retries (and, past the retry limit, fails the sample);
any other exception fails the sample with its reason. The message is only acked once that is written, or once
the database has said the delivery is stale (a newer submission owns the row, or this one already ended).
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import DBAPIError, OperationalError

from core.contract import InvalidMessage, ScoreMessage, parse_message
from core.errors import AllscoreError
from core.logs import log_context
from core.storage import StorageUnavailable
from db import repository
from db.engine import transaction
from db.errors import SampleCancelled, StaleDelivery
from db.repository import Delivery
from worker import metrics
from worker.celery_app import TASK_NAME, app
from worker.context import get_context
from worker.engine import Hooks, score_sample

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


def _mark_failed(sample_id: str, model_version: str, delivery: Delivery, reason: str) -> bool:
    """Record the sample as failed; False when the database is unreachable, so nothing could be recorded."""
    try:
        with transaction(get_context().sessions) as session:
            repository.mark_failed(
                session=session, sample_id=sample_id, model_version=model_version, error=reason, delivery=delivery
            )
    except OperationalError as exc:
        log.error("could not mark sample %s failed (%s): the database is unreachable: %s", sample_id, reason, exc)
        return False
    except StaleDelivery as exc:
        log.warning("sample %s: not marked failed (%s): %s", sample_id, reason, exc)
    except (DBAPIError, AllscoreError) as exc:
        log.error("could not mark sample %s failed (%s): %s", sample_id, reason, exc)
    return True


def _refused(task: Task, exc: InvalidMessage) -> None:
    """A message that breaks the contract is never run; the sample it names, if it can be told, fails."""
    log.error("rejected message %s: %s", task.request.id, exc)
    if exc.key is None:
        return
    job_id, sample_id, version, submission = exc.key
    if not _mark_failed(sample_id, version, Delivery(job_id, submission), f"the task message was refused: {exc}"):
        raise task.retry(countdown=get_context().settings.task_retry_backoff_max)


# max_retries=None: no limit by default; transient faults pass settings.task_max_retries explicitly.
@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def score_sample_task(self: Task, *args: Any, **kwargs: Any) -> None:
    """Score one sample: a core.contract.ScoreMessage as keyword arguments."""
    try:
        message = parse_message(args, kwargs)
    except InvalidMessage as exc:
        _refused(self, exc)
        return
    run_scoring(self, message)


# A worker process that cannot make its context (settings that do not load, TensorFlow failing to start, a soft time
# limit hit while it starts) cannot record anything: the message is retried after this long, maybe elsewhere.
CONTEXT_RETRY_SECONDS = 15.0


def run_scoring(task: Task, message: ScoreMessage) -> None:
    """Score a valid message; whatever happens, the sample ends done or failed, or the message is retried."""
    with log_context(message.job_id, message.sample_id):
        _run_scoring(task, message)


def _job_may_have_ended(ctx: Any, message: ScoreMessage) -> None:
    """If this sample was the job's last and the job asked for a callback, send it (in a background thread)."""
    from worker.notify import notify_in_background

    try:
        notify_in_background(message.job_id, ctx.sessions, ctx.settings)
    except Exception:  # a callback never fails a sample
        log.exception("job %s: could not start its callback", message.job_id)


# A running sample asks the database at most this often (before a batch) whether it was cancelled.
CANCEL_CHECK_SECONDS = 1.0


def _hooks(ctx: Any, message: ScoreMessage, delivery: Delivery) -> Hooks:
    """Metrics per batch and per read; before a batch, stop if the sample was cancelled or superseded."""
    last = [time.monotonic()]

    def check() -> None:
        now = time.monotonic()
        if now - last[0] < CANCEL_CHECK_SECONDS:
            return
        last[0] = now
        with ctx.sessions() as session:
            repository.check_current(
                session=session, sample_id=message.sample_id, model_version=message.model_version, delivery=delivery
            )

    return Hooks(
        batch=lambda cells, seconds: metrics.BATCH_SECONDS.observe(seconds),
        read=metrics.READ_SECONDS.observe,
        check=check,
    )


def _run_scoring(task: Task, message: ScoreMessage) -> None:
    try:
        ctx = get_context()
    except Exception as exc:  # nothing can be recorded without the context: keep the message
        log.exception("sample %s: the worker process could not start its context; retrying", message.sample_id)
        raise task.retry(exc=exc, countdown=CONTEXT_RETRY_SECONDS) from exc
    settings = ctx.settings
    delivery = Delivery(message.job_id, message.submission)

    def fail(reason: str) -> None:
        if _mark_failed(message.sample_id, message.model_version, delivery, reason):
            metrics.SAMPLES.labels("failed").inc()
            _job_may_have_ended(ctx, message)
            return
        # Acking now would leave the sample `running` with nothing left on the queue to finish it: keep the
        # message, past task_max_retries, until the database is back to take the result or the failure.
        delay = settings.task_retry_backoff_max
        log.warning("sample %s: database unreachable; retry in %.1fs", message.sample_id, delay)
        raise task.retry(countdown=delay)

    started = time.perf_counter()
    try:
        loaded = ctx.model(message.model_version, message.model_store)
        summary = score_sample(
            message,
            loaded=loaded,
            fetch=ctx.fetch,
            sessions=ctx.sessions,
            pool=ctx.pool,
            batch_size=settings.batch_size,
            tta=settings.tta,
            flag_thresholds=settings.flag_thresholds,
            max_pixels=settings.max_image_pixels,
            low_count=settings.low_count,
            max_cells=settings.max_cells_per_sample,
            retries=task.request.retries or 0,
            max_deaths=settings.max_worker_deaths,
            hooks=_hooks(ctx, message, delivery),
        )
    except SampleCancelled as exc:
        metrics.SAMPLES.labels("cancelled").inc()
        log.warning("sample %s: cancelled, stopped; nothing written: %s", message.sample_id, exc)
        _job_may_have_ended(ctx, message)
    except StaleDelivery as exc:
        metrics.SAMPLES.labels("stale").inc()
        log.warning("sample %s: stale delivery, nothing written: %s", message.sample_id, exc)
    except TRANSIENT as exc:
        retries = task.request.retries
        if retries >= settings.task_max_retries:
            fail(f"gave up after {retries} retries: {exc}")
            return
        delay = backoff(retries, settings.task_retry_backoff, settings.task_retry_backoff_max)
        log.warning("sample %s: transient fault (%s); retry %d in %.1fs", message.sample_id, exc, retries + 1, delay)
        metrics.SAMPLES.labels("retried").inc()
        raise task.retry(exc=exc, countdown=delay, max_retries=settings.task_max_retries) from exc
    except SoftTimeLimitExceeded:
        fail("time limit exceeded: split the sample or raise the limit")
    except AllscoreError as exc:
        fail(str(exc))
    except Exception as exc:
        log.exception("sample %s: unexpected error", message.sample_id)
        fail(f"unexpected error ({type(exc).__name__}): {exc}")
    else:
        _job_may_have_ended(ctx, message)
        metrics.SAMPLES.labels("done").inc()
        metrics.CELLS_SCORED.inc(summary.n_cells - summary.n_failed)
        metrics.CELLS_FAILED.inc(summary.n_failed)
        elapsed = time.perf_counter() - started
        if elapsed > 0:
            metrics.CELLS_PER_SECOND.set((summary.n_cells - summary.n_failed) / elapsed)
