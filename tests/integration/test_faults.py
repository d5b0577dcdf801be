"""Faults lose nothing. Real Redis, PostgreSQL, moto S3 over HTTP and real workers.

Each test injects one fault an operator can meet (a killed worker process, a restarted broker, a database or S3
server that goes away) and then checks what an operator would check: the rows of the views `sample_results` and
`cell_results`, their status and counts.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from core.settings import reset_settings_cache
from db.engine import parse_url
from tests.harness.faults import RedisServer, wait_until
from tests.helpers import require_service
from tests.integration.stack import Stack, children

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def _db_port(url: str) -> int:
    return int(parse_url(url).port or 5432)


# -- 1. a worker child killed with SIGKILL mid-sample ---------------------------------------------------------


@pytest.mark.timeout(150)
def test_sigkill_of_a_worker_child_mid_sample_redelivers_it_exactly_once(stack: Stack) -> None:
    prefix = stack.upload_sample("slide-k", 40)
    s3 = stack.s3_proxy()
    worker = stack.start_worker(concurrency=1, ALLSCORE_S3_ENDPOINT_URL=f"http://{s3.url_host}")
    # Frozen S3: the sample starts (status running) and then hangs on its first image.
    s3.freeze()
    job = stack.submit({"slide-k": [prefix]})
    wait_until(lambda: stack.sample("slide-k")["status"] == "running", 60, "the sample to start")
    assert stack.cell_count("slide-k") == 0
    assert worker.proc is not None
    (child,) = children(worker.proc.pid)
    os.kill(child, signal.SIGKILL)
    s3.thaw()

    rows = stack.wait_final(job, 1, 90)
    row = stack.sample("slide-k")
    assert (rows["slide-k"]["status"], row["n_cells"], row["n_failed"]) == ("done", 40, 0), row
    assert row["attempts"] == 2, "the killed run and the redelivered one"
    assert stack.cell_count("slide-k") == 40
    assert stack.duplicate_cells() == 0
    assert worker.proc.poll() is None, "the worker survives the loss of a child"
    assert child not in children(worker.proc.pid)
    assert stack.logs().count("sample slide-k: 40 cells") == 1, "scored to completion exactly once"


# -- 2. the worker stopped with SIGTERM mid-run ------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_sigterm_mid_run_requeues_in_flight_work_which_finishes_after_a_restart(stack: Stack) -> None:
    names = [f"slide-t{i}" for i in range(4)]
    prefixes = {name: stack.upload_sample(name, 24, seed=i) for i, name in enumerate(names)}
    s3 = stack.s3_proxy()
    env = {"ALLSCORE_S3_ENDPOINT_URL": f"http://{s3.url_host}", "ALLSCORE_WORKER_SHUTDOWN_GRACE": "3"}
    worker = stack.start_worker(concurrency=2, **env)
    s3.freeze()
    job = stack.submit({name: [prefixes[name]] for name in names})
    wait_until(lambda: sum(r["status"] == "running" for r in stack.rows(job).values()) == 2, 60, "two samples to start")
    in_flight = {s for s, r in stack.rows(job).items() if r["status"] == "running"}
    assert stack.queued_messages() == 2

    assert worker.proc is not None
    started = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    # Stops by itself, although its two samples hang: they are handed back, not waited for.
    worker.proc.wait(timeout=30)
    stopped_in = time.monotonic() - started
    assert stack.queued_messages() == 4, "the two in-flight samples went back to the queue"
    assert {r["status"] for r in stack.rows(job).values()} <= {"queued", "running"}

    s3.thaw()
    stack.start_worker(concurrency=2, **env)
    rows = stack.wait_final(job, 4, 90)
    assert {r["status"] for r in rows.values()} == {"done"}, rows
    for name in names:
        assert (stack.sample(name)["n_cells"], stack.cell_count(name)) == (24, 24)
        assert stack.sample(name)["attempts"] == (2 if name in in_flight else 1)
    assert stack.duplicate_cells() == 0
    assert stopped_in < 20, stopped_in


# -- 3. Redis restarts while samples are queued and running ---------------------------------------------------


@pytest.mark.timeout(180)
def test_redis_restart_with_samples_queued_and_running_loses_nothing(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        broker = RedisServer(tmp_path / "redis").start()
    except (FileNotFoundError, RuntimeError) as exc:
        require_service("redis-server", False, str(exc))
        raise
    try:
        stack.use_broker(broker.url, monkeypatch)
        names = [f"slide-r{i}" for i in range(5)]
        prefixes = {name: stack.upload_sample(name, 24, seed=i) for i, name in enumerate(names)}
        s3 = stack.s3_proxy()
        worker = stack.start_worker(concurrency=2, ALLSCORE_S3_ENDPOINT_URL=f"http://{s3.url_host}")
        s3.freeze()
        job = stack.submit({name: [prefixes[name]] for name in names})
        wait_until(
            lambda: sum(r["status"] == "running" for r in stack.rows(job).values()) == 2, 60, "two samples to start"
        )
        assert stack.broker_keys()["queued"] == 3

        broker.restart()
        # The queued messages survived the restart in the append-only file.
        assert sum(stack.broker_keys().values()) >= 3, stack.broker_keys()
        wait_until(lambda: worker.log().count("Connected to redis://") >= 2, 60, "the worker to reconnect")
        s3.thaw()

        rows = stack.wait_final(job, len(names), 120)
        assert {r["status"] for r in rows.values()} == {"done"}, rows
        for name in names:
            assert (stack.sample(name)["n_cells"], stack.cell_count(name)) == (24, 24), name
        assert stack.duplicate_cells() == 0
        assert worker.proc is not None and worker.proc.poll() is None
        # Nothing is left for a later redelivery either.
        wait_until(lambda: stack.broker_keys() == {"queued": 0, "unacked": 0}, 20, "the broker to drain")
    finally:
        for w in stack.workers:
            w.stop(timeout=20)
        broker.stop()


# -- 4. PostgreSQL unreachable for a while -------------------------------------------------------------------


class PartialWatch:
    """Reads the views every 0.2 s in a thread and records any moment an analyst could see a partial sample."""

    def __init__(self, stack: Stack, job_id: str) -> None:
        import threading

        self.stack = stack
        self.job_id = job_id
        self.seen: list[tuple[str, str, int | None, int]] = []
        self.violations: list[tuple[str, str, int | None, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            # One statement, so one snapshot: a sample row and its cells are read together.
            for r in self.stack.query(
                "SELECT r.sample_id, r.status, r.n_cells, (SELECT count(*) FROM cell_results c "
                "WHERE c.sample_id = r.sample_id AND c.model_version = r.model_version) AS cells "
                "FROM sample_results r WHERE r.job_id = :job",
                job=self.job_id,
            ):
                state = (r["sample_id"], r["status"], r["n_cells"], int(r["cells"]))
                self.seen.append(state)
                complete = r["status"] == "done" and r["n_cells"] == state[3]
                empty = r["status"] != "done" and state[3] == 0
                if not (complete or empty):
                    self.violations.append(state)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.mark.timeout(180)
def test_postgresql_unreachable_for_a_while_retries_and_every_sample_ends_done(stack: Stack) -> None:
    names = [f"slide-p{i}" for i in range(3)]
    prefixes = {name: stack.upload_sample(name, 24, seed=i) for i, name in enumerate(names)}
    s3 = stack.s3_proxy()
    db = stack.proxy(_db_port(stack.pg_url))
    db_via_proxy = parse_url(stack.pg_url).set(host="127.0.0.1", port=db.port)
    worker = stack.start_worker(
        concurrency=2,
        ALLSCORE_S3_ENDPOINT_URL=f"http://{s3.url_host}",
        ALLSCORE_DATABASE_URL=db_via_proxy.render_as_string(hide_password=False),
        # Fewer retries than the outage lasts: a sample whose failure cannot be recorded must not be dropped.
        ALLSCORE_TASK_MAX_RETRIES="2",
    )
    s3.freeze()
    job = stack.submit({name: [prefixes[name]] for name in names})
    watch = PartialWatch(stack, job)
    try:
        wait_until(
            lambda: sum(r["status"] == "running" for r in stack.rows(job).values()) == 2, 60, "two samples to start"
        )
        # The database goes away while two samples are being scored and one waits in the queue.
        db.down()
        s3.thaw()
        wait_until(lambda: worker.log().count("transient fault") >= 6, 60, "the workers to retry")
        time.sleep(3)
        rows = stack.rows(job)
        assert {r["status"] for r in rows.values()} <= {"queued", "running"}, rows
        db.up()
        rows = stack.wait_final(job, len(names), 90)
    finally:
        watch.stop()
    assert {r["status"] for r in rows.values()} == {"done"}, rows
    for name in names:
        assert (stack.sample(name)["n_cells"], stack.cell_count(name)) == (24, 24), name
    assert stack.duplicate_cells() == 0
    assert watch.violations == [], watch.violations[:5]
    assert len(watch.seen) > 20
    assert db.connections > 0


# -- 5. the S3 server is down -----------------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_s3_down_fails_the_sample_with_a_clear_reason_and_resubmitting_works(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.artifact import Registry

    # As in production, the model store is on S3 too: the outage hits the model's download and the images'.
    models = f"{stack.bucket}/models"
    Registry(models).publish(*Registry(stack.model.store).fetch(stack.model.ref))
    monkeypatch.setenv("ALLSCORE_MODEL_STORE", models)
    reset_settings_cache()
    prefix = stack.upload_sample("slide-s", 24)
    s3 = stack.s3_proxy()
    endpoint = f"http://{s3.url_host}"
    worker = stack.start_worker(
        concurrency=1, ALLSCORE_S3_ENDPOINT_URL=endpoint, ALLSCORE_MODEL_STORE=models, ALLSCORE_TASK_MAX_RETRIES="2"
    )

    def outage(sample_id: str, where: str) -> None:
        """S3 down: the sample retries, then fails saying why; S3 back: resubmitting it works."""
        s3.down()
        job = stack.submit({sample_id: [prefix]})
        (row,) = stack.wait_final(job, 1, 90).values()
        assert row["status"] == "failed", row
        assert "gave up after 2 retries" in row["error"] and where in row["error"], row["error"]
        assert "cannot reach" in row["error"] and endpoint in row["error"], row["error"]
        assert "check that the S3 server is up" in row["error"]
        assert row["n_cells"] is None and stack.cell_count(sample_id) == 0
        assert worker.log().count(f"{sample_id}: transient fault") == 2
        s3.up()
        job = stack.submit({sample_id: [prefix]})
        (row,) = stack.wait_final(job, 1, 60).values()
        assert (row["status"], row["n_cells"], row["n_failed"], row["error"]) == ("done", 24, 0, None), row
        assert stack.cell_count(sample_id) == 24
        assert len(stack.query("SELECT 1 FROM sample_results WHERE sample_id = :s", s=sample_id)) == 1

    outage("slide-s-before-model", f"{models}/tiny/v1/")  # the model cannot be downloaded
    outage("slide-s-model-loaded", f"{prefix}cell_")  # the model is loaded; the images cannot be read
    assert stack.duplicate_cells() == 0
    assert len(re.findall("model loaded: ", worker.log())) == 1
