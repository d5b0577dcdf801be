"""Completion callbacks on real parts: a real local HTTP server receives one signed POST per job once every sample
has ended (retried through a 503), none to a host the workers do not allow, and the sweeper sends those of jobs
ended by `allscore cancel`."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from core.settings import get_settings, reset_settings_cache
from tests.harness.faults import wait_until
from tests.integration.stack import Stack
from worker.client import SubmitError, cancel, submit_samples, wait_for_job
from worker.notify import SIGNATURE_HEADER, verify

pytestmark = pytest.mark.integration

SECRET = "test-callback-secret-0123456789abcdef"


class Receiver:
    """A lab's endpoint: records every POST; answers 503 to the first `fail_first` of them."""

    def __init__(self, fail_first: int = 0) -> None:
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.posts.append((self.path, dict(self.headers.items()), body))
                status = 503 if len(receiver.posts) <= receiver.fail_first else 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [json.loads(body) for p, _, body in self.posts if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver(fail_first=1)
    yield found
    found.close()


@pytest.mark.timeout(300)
def test_one_signed_callback_per_job_only_to_allowed_hosts(
    stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = stack.upload_sample("notify-a", 6, seed=1)
    b = stack.upload_sample("notify-b", 5, seed=2)
    stack.start_worker(
        concurrency=2,
        ALLSCORE_NOTIFY_HOSTS=json.dumps([f"127.0.0.1:{receiver.port}"]),
        ALLSCORE_NOTIFY_SECRET=SECRET,
        ALLSCORE_NOTIFY_BACKOFF="0.2",
    )
    job = submit_samples(
        {"notify-a": [a], "notify-b": [b]},
        model_ref=stack.model.ref,
        notify=receiver.url("/done"),
        settings=get_settings(),
    )
    rows = wait_for_job(job, timeout=120)
    assert sorted(r["status"] for r in rows) == ["done", "done"]
    # The first try met a 503: retried, then delivered.
    wait_until(lambda: len(receiver.bodies("/done")) == 2, 30, "the callback")
    first, body = receiver.bodies("/done")
    assert first["job_id"] == body["job_id"] == job  # the same callback, tried twice
    assert body["event"] == "allscore.job.ended" and body["job_id"] == job
    assert body["counts"] == {"done": 2}
    by_sample = {s["sample_id"]: s for s in body["samples"]}
    assert (by_sample["notify-a"]["n_cells"], by_sample["notify-b"]["n_cells"]) == (6, 5)
    assert (
        by_sample["notify-a"]["all_fraction"] == next(r for r in rows if r["sample_id"] == "notify-a")["all_fraction"]
    )
    # Signed with the shared secret: verifies, and not under another secret or with another body.
    _, headers, raw = receiver.posts[-1]
    assert verify(raw, headers[SIGNATURE_HEADER], SECRET)
    assert not verify(raw, headers[SIGNATURE_HEADER], "another-secret")
    assert not verify(raw.replace(b"notify-a", b"notify-x"), headers[SIGNATURE_HEADER], SECRET)
    (status,) = stack.query("SELECT notify_status FROM jobs WHERE id = :j", j=job)
    assert status["notify_status"] == "delivered: HTTP 204 after 2 tries"

    # A job's callback is sent once, however often its samples are delivered or the sweeper looks.
    from worker.sweep import sweep

    report = sweep(get_settings())
    assert report.notified == []
    assert len(receiver.bodies("/done")) == 2

    # A host the workers do not allow (the same server, named otherwise) gets nothing; the job says why.
    job2 = submit_samples(
        {"notify-b": [b]},
        model_ref=stack.model.ref,
        notify=receiver.url("/other", host="localhost"),
        settings=get_settings(),
    )
    wait_for_job(job2, timeout=120)
    wait_until(
        lambda: (
            stack.query("SELECT notify_status FROM jobs WHERE id = :j", j=job2)[0]["notify_status"] or ""
        ).startswith("not sent"),
        30,
        "the refusal to be recorded",
    )
    assert (
        "is not one the operator allows"
        in stack.query("SELECT notify_status FROM jobs WHERE id = :j", j=job2)[0]["notify_status"]
    )
    assert receiver.bodies("/other") == []

    # The submitter's own list, when set, refuses such a URL at submit; a non-http URL is refused always.
    monkeypatch.setenv("ALLSCORE_NOTIFY_HOSTS", json.dumps([f"127.0.0.1:{receiver.port}"]))
    reset_settings_cache()
    for bad in (receiver.url("/x", host="localhost"), "file:///etc/passwd", "http://user:pw@127.0.0.1/"):
        with pytest.raises(SubmitError):
            submit_samples({"notify-b": [b]}, model_ref=stack.model.ref, notify=bad, settings=get_settings())


@pytest.mark.timeout(300)
def test_the_sweeper_sends_the_callback_of_a_job_ended_by_cancel(
    stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = stack.upload_sample("cancelled-a", 4, seed=3)
    job = submit_samples({"cancelled-a": [a]}, model_ref=stack.model.ref, notify=receiver.url("/c"))
    assert [c.sample_id for c in cancel(job_id=job)] == ["cancelled-a"]
    # The sweeper runs with the workers' settings.
    monkeypatch.setenv("ALLSCORE_NOTIFY_HOSTS", json.dumps([f"127.0.0.1:{receiver.port}"]))
    monkeypatch.setenv("ALLSCORE_NOTIFY_SECRET", SECRET)
    monkeypatch.setenv("ALLSCORE_NOTIFY_BACKOFF", "0.1")
    reset_settings_cache()
    from worker.sweep import sweep

    assert sweep(get_settings()).notified == [job]
    (body,) = [b for b in receiver.bodies("/c")][-1:]
    assert body["counts"] == {"cancelled": 1} and body["job_id"] == job
    assert len(receiver.bodies("/c")) == 2  # the 503, then the delivery
    assert sweep(get_settings()).notified == []
    assert len(receiver.bodies("/c")) == 2
