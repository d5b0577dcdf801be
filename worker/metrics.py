"""Prometheus metrics of a worker container, and its health endpoint.

Every prefork process counts into prometheus-client's multiprocess files (PROMETHEUS_MULTIPROC_DIR, which
`allscore worker` sets to a fresh folder before anything imports prometheus-client); the main process serves
them all on one port (ALLSCORE_METRICS_PORT) at /metrics, with what it reads at each scrape: the length of the
queues it consumes (Redis) and the samples by status (the database). /healthz answers 200 while the worker's
consumer is connected and consuming its queues (HealthBeat, a consumer bootstep, beats from inside Celery's
event loop, so a hung loop goes stale), else 503. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

CELLS_SCORED = Counter("allscore_cells_scored", "cells scored by the model (images, or cells cut from fields)")
CELLS_FAILED = Counter("allscore_cells_failed", "images or fields that could not be scored (a cell row with an error)")
SAMPLES = Counter(
    "allscore_samples",
    "samples a worker process finished, by outcome: done, failed, cancelled, stale (nothing written), retried",
    ["outcome"],
)
BATCH_SECONDS = Histogram(
    "allscore_batch_seconds", "one forward pass of the model over a fixed-size batch", buckets=_LATENCY_BUCKETS
)
READ_SECONDS = Histogram(
    "allscore_read_seconds",
    "fetching and decoding one image (a cell, or a field with its segmentation), in an I/O thread",
    buckets=_LATENCY_BUCKETS,
)
MODEL_LOADS = Counter(
    "allscore_model_loads",
    "model versions loaded (one per process and version), by the runtime and precision that serve them",
    ["runtime", "precision"],
)
MODEL_LOAD_SECONDS = Histogram(
    "allscore_model_load_seconds",
    "fetching, checking and preparing one model version",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
CELLS_PER_SECOND = Gauge(
    "allscore_sample_cells_per_second",
    "cells per second over the last sample a worker process finished (rate(allscore_cells_scored_total) is the flow)",
    multiprocess_mode="mostrecent",
)


def process_exited(pid: int) -> None:
    """Forget a finished process's live gauges (prometheus-client's mark_process_dead)."""
    if os.environ.get(MULTIPROC_VARIABLE):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


class HealthState:
    """What the consumer's last beat said: connected, consuming these queues, at this monotonic time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.beat_at: float | None = None
        self.ok = False
        self.detail: dict[str, Any] = {"state": "starting"}

    def beat(self, ok: bool, **detail: Any) -> None:
        with self._lock:
            self.beat_at = time.monotonic()
            self.ok = ok
            self.detail = detail

    def stopped(self, why: str) -> None:
        with self._lock:
            self.ok = False
            self.detail = {"state": why}

    def check(self, max_age: float) -> tuple[bool, dict[str, Any]]:
        """(healthy, what to say): healthy while the last beat is fresh and said consuming."""
        with self._lock:
            age = None if self.beat_at is None else time.monotonic() - self.beat_at
            detail = {**self.detail, "beat_age_s": None if age is None else round(age, 3)}
            fresh = age is not None and age <= max_age
            if not fresh and age is not None:
                detail["state"] = "stale: the consumer's event loop has not beaten"
            return bool(self.ok and fresh), detail


HEALTH = HealthState()


class QueueAndStatusCollector(Collector):
    """At each scrape: messages waiting in each queue this worker consumes (Redis), and samples by status."""

    def __init__(self, settings: Any, queues: Sequence[str]) -> None:
        self.settings = settings
        self.queues = list(queues)
        self._engine: Any = None

    def _queue_lengths(self) -> dict[str, int] | None:
        if not self.settings.broker_url.startswith(("redis://", "rediss://")):
            return None
        import redis

        client = redis.Redis.from_url(self.settings.broker_url, socket_connect_timeout=3, socket_timeout=5)
        try:
            return {queue: int(client.llen(queue)) for queue in self.queues}
        finally:
            client.close()

    def _statuses(self) -> dict[str, int]:
        from sqlalchemy import func, select

        from db.engine import make_engine
        from db.models import Sample, SampleStatus

        if self._engine is None:
            self._engine = make_engine(self.settings.database_url, self.settings)
        counts = dict.fromkeys((s.value for s in SampleStatus), 0)
        try:
            with self._engine.connect() as conn:
                for status, n in conn.execute(select(Sample.status, func.count()).group_by(Sample.status)):
                    counts[str(getattr(status, "value", status))] = int(n)
        finally:
            # No connection is held between scrapes (nor inherited by a pool process forked later).
            self._engine.dispose()
        return counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "allscore_exporter_source_up", "whether the last scrape could read the source", labels=["source"]
        )
        try:
            lengths = self._queue_lengths()
        except Exception as exc:  # noqa: BLE001 -- a scrape reports the source down, it does not fail
            log.warning("metrics: cannot read the queue lengths: %s", exc)
            lengths, broker_ok = None, False
        else:
            broker_ok = True
        if lengths is not None:
            queue = GaugeMetricFamily("allscore_queue_length", "messages waiting in the queue", labels=["queue"])
            for name, n in lengths.items():
                queue.add_metric([name], n)
            yield queue
        up.add_metric(["broker"], 1.0 if broker_ok else 0.0)
        try:
            counts = self._statuses()
        except Exception as exc:  # noqa: BLE001
            log.warning("metrics: cannot read the samples by status: %s", exc)
            up.add_metric(["database"], 0.0)
        else:
            up.add_metric(["database"], 1.0)
            by_status = GaugeMetricFamily("allscore_samples_by_status", "sample rows by status", labels=["status"])
            for status, n in sorted(counts.items()):
                by_status.add_metric([status], n)
            yield by_status
        healthy, _ = HEALTH.check(self.settings.health_max_age)
        yield GaugeMetricFamily("allscore_worker_consuming", "1 while the consumer is consuming", value=healthy)
        yield up


def _registry(settings: Any, queues: Sequence[str]) -> Any:
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_VARIABLE):
        multiprocess.MultiProcessCollector(registry)
    registry.register(QueueAndStatusCollector(settings, queues))
    return registry


def serve(settings: Any, queues: Iterable[str], port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve /metrics and /healthz on `port` from a daemon thread of this (the main) process."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    registry = _registry(settings, list(queues))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, status, kind = generate_latest(registry), 200, CONTENT_TYPE_LATEST
            elif path == "/healthz":
                healthy, detail = HEALTH.check(settings.health_max_age)
                body, status, kind = json.dumps(detail).encode(), 200 if healthy else 503, "application/json"
            else:
                body, status, kind = b"not found: /metrics, /healthz\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds: not logged
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="allscore-metrics", daemon=True).start()
    log.info("metrics on http://%s:%d/metrics, health on /healthz", host, server.server_address[1])
    return server
