"""The Celery app. Configured from settings on first use (never at import time); TensorFlow is not imported here."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator, Mapping
from typing import Any

from celery import Celery, bootsteps, signals

from core.settings import Settings, get_settings

TASK_NAME = "allscore.score_sample"

log = logging.getLogger(__name__)


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery settings allscore runs with (docs/ARCHITECTURE.md, "Every sample ends once")."""
    # The broker must not hand a task to a second worker while the first may still be running it:
    # the visibility timeout sits above the hard time limit.
    visibility = settings.task_time_limit + 600
    transport: dict[str, Any] = {"visibility_timeout": visibility}
    if settings.broker_url.startswith("filesystem://"):
        # The embedded broker (no server): kombu's filesystem transport, a folder under ALLSCORE_HOME.
        folder = settings.home / "broker"
        (folder / "processed").mkdir(parents=True, exist_ok=True)
        transport = {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "processed_folder": str(folder / "processed"),
            # Its exchange table; kombu's default is ./control, in whatever folder the command ran from.
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport,
        # Pickle can run code on the worker: accept JSON only.
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        # Status lives in our database, not in a result backend.
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.queue,
        "task_routes": {TASK_NAME: {"queue": settings.queue}},
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
        "task_track_started": False,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # Cold shutdown (see _sigterm_hands_work_back) waits this long for running tasks before cancelling them.
        "worker_soft_shutdown_timeout": settings.worker_shutdown_grace,
    }


class _SettingsConfig(Mapping[str, Any]):
    """Celery's configuration source, computed from settings when Celery first reads it (not at import)."""

    def __init__(self) -> None:
        self._data: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._data is None:
            self._data = celery_config(get_settings())
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


app = Celery("allscore", include=["worker.tasks"])
app.config_from_object(_SettingsConfig())

HEALTH_BEAT_SECONDS = 5.0


class HealthBeat(bootsteps.StartStopStep):
    """A consumer bootstep: every few seconds, from inside Celery's event loop, record whether the consumer is
    connected to the broker and consuming each of its queues (worker.metrics.HEALTH, read by /healthz).

    It runs on the loop that takes messages, so a loop that hangs stops beating and /healthz goes stale; a broker
    connection that is lost stops the consumer's steps (this one too) until it is back. Asking nothing of the
    broker or the other workers, it is as cheap as a health check can be.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.tref: Any = None

    def start(self, c: Any) -> None:
        # The consumer starts consuming when its event loop starts, after the steps: the first beat comes from
        # the loop itself.
        c.timer.call_after(0.1, self.beat, (c,), priority=10)
        self.tref = c.timer.call_repeatedly(HEALTH_BEAT_SECONDS, self.beat, (c,), priority=10)

    def stop(self, c: Any) -> None:
        from worker.metrics import HEALTH

        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        HEALTH.stopped("stopped: the consumer is not running (broker connection lost, or shutting down)")

    shutdown = stop

    def beat(self, c: Any) -> None:
        from worker.metrics import HEALTH

        consumer = c.task_consumer
        queues = [q.name for q in consumer.queues] if consumer is not None else []
        consuming = bool(queues) and all(consumer.consuming_from(q) for q in queues)
        connected = bool(c.connection is not None and c.connection.connected)
        state = "consuming" if consuming and connected else "not consuming"
        HEALTH.beat(consuming and connected, state=state, queues=queues, connected=connected, pid=os.getpid())


app.steps["consumer"].add(HealthBeat)


@signals.worker_process_shutdown.connect
def _forget_process_metrics(pid: int | None = None, **_: Any) -> None:
    """A pool process that ends leaves no live gauges behind (prometheus-client multiprocess mode)."""
    from worker.metrics import process_exited

    process_exited(pid or os.getpid())


def log_to_json(loglevel: str) -> None:
    """Make every process of this worker log one JSON object per line (ALLSCORE_LOG_FORMAT=json)."""

    @signals.setup_logging.connect(weak=False)
    def _setup(loglevel: Any = None, **_: Any) -> None:
        from core.logs import setup_logging

        setup_logging(loglevel or "INFO", "json")


@signals.worker_ready.connect
def _sigterm_hands_work_back(sender: Any = None, **_: Any) -> None:
    """Make SIGTERM (docker stop, scaling down) a bounded shutdown that requeues the samples still running.

    Celery's SIGTERM is a warm shutdown that waits for every running task however long it takes, so the
    container is killed when its stop grace period ends, and the killed samples' messages stay invisible
    on Redis for the whole visibility timeout. Its SIGQUIT is a cold shutdown: running tasks get
    worker_soft_shutdown_timeout seconds to finish, the rest are cancelled and, being acks_late, go back
    to the queue at once for another worker. SIGTERM is routed to that, in the prefork pool (the solo pool
    runs tasks in the main process, which cannot cancel them, so it keeps Celery's warm shutdown).
    """
    from celery import platforms
    from celery.concurrency.prefork import TaskPool

    if not isinstance(getattr(sender, "pool", None), TaskPool):
        return

    def on_sigterm(*_: Any) -> None:
        log.warning("SIGTERM: finishing or requeueing running samples, then stopping")
        os.kill(os.getpid(), signal.SIGQUIT)

    platforms.signals["SIGTERM"] = on_sigterm
