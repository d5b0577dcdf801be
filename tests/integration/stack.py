"""The deployment the reliability tests drive: real workers on the local Redis, PostgreSQL and S3 server.

A Stack is one deployment on this machine: the test's client settings, the workers' environment, and what an
operator checks (the views, the broker's keys, the workers' logs). The `stack` fixture is in conftest.py.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest
from sqlalchemy import Engine, text

from core.settings import get_settings, reset_settings_cache
from core.storage import store_for
from db.engine import make_engine
from tests.fixtures import PublishedModel
from tests.harness.faults import FaultProxy, wait_until
from tests.worker_process import WorkerProcess
from worker.client import submit_samples

FINAL = ("done", "failed", "cancelled")


def children(pid: int) -> list[int]:
    """The child processes of pid (a prefork worker's pool processes)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


class Stack:
    """One deployment on this machine: the test's client settings, the workers' environment, the checks."""

    def __init__(
        self, tmp: Path, pg_url: str, redis_url: str, s3_endpoint: str, bucket: str, model: PublishedModel
    ) -> None:
        self.tmp = tmp
        self.pg_url = pg_url
        self.redis_url = redis_url
        self.s3_endpoint = s3_endpoint
        self.bucket = bucket
        self.model = model
        self.queue = f"allscore-rel-{uuid.uuid4().hex[:8]}"
        self.engine: Engine = make_engine(pg_url)
        self.workers: list[WorkerProcess] = []
        self.proxies: list[FaultProxy] = []

    # -- the workers' side ----------------------------------------------------------------------------------
    def worker_env(self, **overrides: str) -> dict[str, str]:
        """The environment of a worker: this stack's services, short retries, the model in a local store."""
        env = {
            "ALLSCORE_HOME": str(self.tmp / f"worker-home-{len(self.workers)}"),
            "ALLSCORE_DATABASE_URL": self.pg_url,
            "ALLSCORE_BROKER_URL": self.redis_url,
            "ALLSCORE_QUEUE": self.queue,
            "ALLSCORE_MODEL_STORE": self.model.store,
            "ALLSCORE_S3_ENDPOINT_URL": self.s3_endpoint,
            "ALLSCORE_S3_MAX_ATTEMPTS": "2",
            "ALLSCORE_S3_CONNECT_TIMEOUT": "2",
            "ALLSCORE_S3_READ_TIMEOUT": "30",
            "ALLSCORE_BATCH_SIZE": "16",
            "ALLSCORE_TASK_MAX_RETRIES": "3",
            "ALLSCORE_TASK_RETRY_BACKOFF": "0.5",
            "ALLSCORE_TASK_RETRY_BACKOFF_MAX": "2",
        }
        env.update(overrides)
        return env

    def start_worker(
        self, concurrency: int = 1, *, python: str | None = None, cwd: Path | None = None, **overrides: str
    ) -> WorkerProcess:
        """Start a real `allscore worker` (prefork) and wait until it consumes; `python`: another install's."""
        env = self.worker_env(**overrides)
        worker = WorkerProcess(
            env,
            self.tmp / f"worker-{len(self.workers)}.log",
            concurrency=concurrency,
            python=python or sys.executable,
            cwd=cwd,
        )
        self.workers.append(worker)
        return worker.start(timeout=90)

    def proxy(self, target_port: int) -> FaultProxy:
        """A fault proxy in front of a local port, closed with the stack."""
        proxy = FaultProxy(target_port).up()
        self.proxies.append(proxy)
        return proxy

    def s3_proxy(self) -> FaultProxy:
        """A fault proxy in front of the S3 server; point a worker's ALLSCORE_S3_ENDPOINT_URL at it."""
        port = int(self.s3_endpoint.rsplit(":", 1)[1])
        return self.proxy(port)

    # -- the client's side ----------------------------------------------------------------------------------
    def upload_sample(self, name: str, n_cells: int, fraction: float = 0.3, seed: int = 0) -> str:
        """Write n synthetic 64x64 cells and upload them under s3://bucket/slides/name/; return that prefix."""
        from trainer.synth import write_sample

        paths = write_sample(self.tmp / "slides" / name, n_cells, fraction, seed=seed, size=64)
        store = store_for(self.bucket)
        prefix = f"{self.bucket}/slides/{name}/"
        for path in paths:
            store.upload(path, prefix + path.name)
        return prefix

    def submit(
        self,
        samples: Mapping[str, Sequence[str]],
        model_ref: str | None = None,
        kind: Mapping[str, Literal["cells", "fields"]] | None = None,
    ) -> str:
        """Submit as a lab pipeline does (worker.client), with the test's settings; return the job id. `kind`:
        sample id -> "fields" for the samples given as microscope fields."""
        return submit_samples(
            samples, model_ref=model_ref or self.model.ref, settings=get_settings(), kind=kind or "cells"
        )

    # -- what an operator checks ----------------------------------------------------------------------------
    def query(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text(sql), params)]

    def rows(self, job_id: str) -> dict[str, dict[str, Any]]:
        """sample_results of one job, by sample id."""
        found = self.query("SELECT * FROM sample_results WHERE job_id = :job", job=job_id)
        return {r["sample_id"]: r for r in found}

    def sample(self, sample_id: str) -> dict[str, Any]:
        """The one sample_results row of a sample, with the number of times a worker started it."""
        (row,) = self.query(
            "SELECT r.*, s.attempts FROM sample_results r JOIN samples s "
            "ON s.sample_id = r.sample_id AND s.model_version = r.model_version WHERE r.sample_id = :s",
            s=sample_id,
        )
        return row

    def wait_final(self, job_id: str, n_samples: int, timeout: float) -> dict[str, dict[str, Any]]:
        """Poll sample_results until every sample of the job is done or failed."""
        found: dict[str, dict[str, Any]] = {}

        def finished() -> bool:
            nonlocal found
            found = self.rows(job_id)
            return len(found) == n_samples and all(r["status"] in FINAL for r in found.values())

        try:
            wait_until(finished, timeout, f"job {job_id} to finish", interval=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {[(s, r['status'], r['error']) for s, r in found.items()]}") from None
        return found

    def cell_count(self, sample_id: str) -> int:
        """cell_results rows of a sample."""
        return int(self.query("SELECT count(*) AS n FROM cell_results WHERE sample_id = :s", s=sample_id)[0]["n"])

    def duplicate_cells(self) -> int:
        """(sample, image, model version) triples that appear more than once in cell_results."""
        return int(
            self.query(
                "SELECT count(*) AS n FROM (SELECT sample_id, image_uri, model_version FROM cell_results "
                "GROUP BY 1, 2, 3 HAVING count(*) > 1) d"
            )[0]["n"]
        )

    def queued_messages(self) -> int:
        """Messages waiting in this stack's queue on the broker."""
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2)
        try:
            return int(client.llen(self.queue))
        finally:
            client.close()

    def use_broker(self, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point the workers started from now on, and the test's own submissions, at another broker."""
        self.redis_url = url
        monkeypatch.setenv("ALLSCORE_BROKER_URL", url)
        reset_settings_cache()

    def broker_keys(self) -> dict[str, int]:
        """Size of the broker's queue and of its hash of delivered-but-unacknowledged messages."""
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2)
        try:
            return {"queued": int(client.llen(self.queue)), "unacked": len(self._unacked(client))}
        finally:
            client.close()

    def _unacked(self, client: Any) -> list[bytes]:
        """Tags of this queue's delivered-but-unacknowledged messages (kombu keeps one hash for all queues)."""
        import json

        return [
            tag
            for tag, value in client.hgetall("unacked").items()
            if json.loads(value)[2] == self.queue or json.loads(value)[1] == self.queue
        ]

    def logs(self) -> str:
        return "\n".join(w.log() for w in self.workers)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop(timeout=20)
        for proxy in self.proxies:
            proxy.close()
        self.engine.dispose()
        try:
            import redis

            client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2)
            client.delete(self.queue, f"_kombu.binding.{self.queue}", f"_kombu.binding_permanent.{self.queue}")
            tags = self._unacked(client)
            if tags:
                client.hdel("unacked", *tags)
                client.zrem("unacked_index", *tags)
            client.close()
        except Exception:  # noqa: BLE001 -- best-effort cleanup of a broker that a test may have stopped
            pass
