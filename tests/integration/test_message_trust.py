"""Every sample ends, exactly once, and the worker trusts nothing it is sent.

Messages go straight onto the broker, as an attacker or a buggy client would send them, for samples whose rows
exist; a real worker (prefork, real Redis, PostgreSQL and model store) takes them. What is checked is what a lab
pipeline waits on: every sample reaches `done` or `failed` with its reason, a stale delivery writes nothing, and
nothing outside the allowed roots, no device or FIFO, and no file over the byte limit is read.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from core.contract import ScoreMessage
from db import repository
from db.engine import session_factory, transaction
from db.errors import JobExistsError
from tests.harness.faults import wait_until
from tests.integration.stack import FINAL, Stack
from worker.client import SubmitError, submit_samples

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def _enqueue(stack: Stack, sample_id: str, times: int = 1) -> tuple[str, int]:
    """Record a sample as a submit would (without sending anything); return its job id and submission."""
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    sessions = session_factory(stack.engine)
    with transaction(sessions) as session:
        repository.create_job(session=session, job_id=job_id, n_samples=1)
        for _ in range(times):
            queued = repository.enqueue_sample(
                session=session, job_id=job_id, sample_id=sample_id, model_version=stack.model.ref
            )
    return job_id, queued.submission


def _send(stack: Stack, *messages: dict[str, Any]) -> None:
    from kombu import Connection

    from worker.celery_app import TASK_NAME, app

    with Connection(stack.redis_url) as conn:
        for kwargs in messages:
            app.send_task(TASK_NAME, kwargs=kwargs, queue=stack.queue, connection=conn)


def _message(stack: Stack, sample_id: str, job_id: str, submission: int, uris: list[str], **extra: Any) -> dict:
    base = ScoreMessage(
        job_id=job_id,
        sample_id=sample_id,
        image_uris=tuple(uris),
        model_version=stack.model.ref,
        submission=submission,
    ).to_kwargs()
    return {**base, **extra}


def _row(stack: Stack, sample_id: str) -> dict[str, Any]:
    (row,) = stack.query("SELECT * FROM sample_results WHERE sample_id = :s", s=sample_id)
    return row


def _wait_ended(stack: Stack, sample_ids: list[str], timeout: float = 90) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}

    def ended() -> bool:
        nonlocal rows
        rows = {s: _row(stack, s) for s in sample_ids}
        return all(r["status"] in FINAL for r in rows.values())

    try:
        wait_until(ended, timeout, "every sample to end", interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {[(s, r['status'], r['error']) for s, r in rows.items()]}") from None
    return rows


def _cell_errors(stack: Stack, sample_id: str) -> dict[str, str | None]:
    cells = stack.query("SELECT image_uri, error FROM cell_results WHERE sample_id = :s", s=sample_id)
    return {c["image_uri"]: c["error"] for c in cells}


@pytest.mark.timeout(180)
def test_hostile_messages_end_their_samples_and_the_worker_reads_nothing_it_should_not(
    stack: Stack, tmp_path: Path
) -> None:
    from trainer.synth import write_sample

    allowed = tmp_path / "allowed"
    good = [str(p) for p in write_sample(allowed / "slide", 3, 0.3, size=64)]
    fifo = allowed / "fifo.bmp"
    os.mkfifo(fifo)
    big = allowed / "big.bmp"
    big.write_bytes(b"BM" + b"\0" * 300_000)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.bmp"
    shutil.copy(good[0], secret)
    worker = stack.start_worker(
        concurrency=1,
        ALLSCORE_ALLOWED_ROOTS=f'["{allowed}", "s3://no-such-bucket-allscore"]',
        ALLSCORE_MAX_IMAGE_BYTES="200000",
    )
    cases: dict[str, tuple[dict[str, Any], str, str]] = {
        # sample id: (message change, final status, the reason it must give)
        "nul-byte": ({"image_uris": [f"{allowed}/cell\x00.bmp", *good]}, "failed", "holds a NUL"),
        "lone-surrogate": ({"image_uris": [*good, f"{allowed}/\ud800.bmp"]}, "failed", "lone surrogate"),
        "etc-passwd": ({"image_uris": ["/etc/passwd", *good]}, "done", "outside the allowed roots"),
        "climb-out": ({"image_uris": [f"{allowed}/../outside/secret.bmp", *good]}, "done", "outside the allowed"),
        "dev-zero": ({"image_uris": ["/dev/zero", *good]}, "done", "outside the allowed roots"),
        "fifo": ({"image_uris": [str(fifo), *good]}, "done", "not a regular file"),
        "too-big": ({"image_uris": [str(big), *good]}, "done", "the limit is 200000"),
        "store-as-path": ({"model_store": "/etc"}, "failed", "message was refused"),
        "store-unlisted": ({"model_store": "archive"}, "failed", "not one of this worker's stores"),
        "no-such-version": ({"model_version": "tiny:no-such-version"}, "failed", "no model manifest"),
        # A store that refuses (no such bucket here; access denied and bad credentials alike) will not pass: the
        # sample fails with the reason rather than ending `done` with every cell failed.
        "no-such-bucket": ({"image_uris": ["s3://no-such-bucket-allscore/a.bmp", *good]}, "failed", "bucket"),
    }
    for sample_id, (change, _, _) in cases.items():
        version = change.get("model_version", stack.model.ref)
        job_id = f"job-{uuid.uuid4().hex[:8]}"
        with transaction(session_factory(stack.engine)) as session:
            repository.create_job(session=session, job_id=job_id, n_samples=1)
            submission = repository.enqueue_sample(
                session=session, job_id=job_id, sample_id=sample_id, model_version=version
            ).submission
        _send(stack, {**_message(stack, sample_id, job_id, submission, good), **change})

    found = {}
    for sample_id in cases:
        version = cases[sample_id][0].get("model_version", stack.model.ref)

        def ended(sample_id: str = sample_id, version: str = version) -> bool:
            rows = stack.query(
                "SELECT * FROM sample_results WHERE sample_id = :s AND model_version = :v", s=sample_id, v=version
            )
            found[sample_id] = rows[0]
            return rows[0]["status"] in FINAL

        wait_until(ended, 90, f"sample {sample_id} to end", interval=0.5)
    for sample_id, (_, status, reason) in cases.items():
        row = found[sample_id]
        assert row["status"] == status, (sample_id, row["status"], row["error"])
        if status == "failed":
            assert reason in row["error"], (sample_id, row["error"])
            continue
        errors = _cell_errors(stack, sample_id)
        bad = [uri for uri, error in errors.items() if error]
        assert len(bad) == 1 and reason in str(errors[bad[0]]), (sample_id, errors)
        assert (row["n_cells"], row["n_failed"]) == (len(good) + 1, 1), sample_id
    assert worker.proc is not None and worker.proc.poll() is None, "the worker survives every hostile message"
    assert "unexpected error" not in worker.log(), "every hostile input maps to a typed, named error"


@pytest.mark.timeout(180)
def test_a_stale_or_repeated_delivery_never_touches_the_newer_result(stack: Stack, tmp_path: Path) -> None:
    from trainer.synth import write_sample

    cells = [str(p) for p in write_sample(tmp_path / "slide", 6, 0.3, size=64)]
    job_id, submission = _enqueue(stack, "S-fenced", times=2)
    assert submission == 2
    worker = stack.start_worker(concurrency=1)
    # The old submission's message arrives first (a redelivery from before the resubmission), then the current one.
    _send(
        stack,
        _message(stack, "S-fenced", job_id, 1, cells[:2]),
        _message(stack, "S-fenced", job_id, 2, cells),
    )
    row = _wait_ended(stack, ["S-fenced"])["S-fenced"]
    assert (row["status"], row["n_cells"]) == ("done", len(cells))
    wait_until(lambda: stack.broker_keys() == {"queued": 0, "unacked": 0}, 60, "both messages to be consumed")
    assert "stale delivery, nothing written" in worker.log()
    before = stack.query("SELECT image_uri, p_all FROM cell_results WHERE sample_id = 'S-fenced' ORDER BY 1")
    # A duplicate of the current submission after it ended, and a stale one that would fail, write nothing.
    _send(
        stack,
        _message(stack, "S-fenced", job_id, 2, cells[:1]),
        _message(stack, "S-fenced", job_id, 1, cells, model_store="/etc"),
        _message(stack, "S-fenced", "another-job", 2, cells[:1]),
    )
    wait_until(lambda: stack.broker_keys() == {"queued": 0, "unacked": 0}, 60, "the late messages to be consumed")
    after_row = _row(stack, "S-fenced")
    assert (after_row["status"], after_row["n_cells"], after_row["finished_at"]) == (
        "done",
        len(cells),
        row["finished_at"],
    )
    assert stack.query("SELECT image_uri, p_all FROM cell_results WHERE sample_id = 'S-fenced' ORDER BY 1") == before
    assert worker.log().count("nothing written") >= 3


@pytest.mark.timeout(180)
def test_submit_store_names_a_listed_store_and_a_corrupt_model_there_fails_the_sample(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import get_settings, reset_settings_cache
    from trainer.synth import write_sample

    archive = tmp_path / "archive"
    broken = tmp_path / "broken"
    shutil.copytree(stack.model.store, archive)
    shutil.copytree(stack.model.store, broken)
    name, version = stack.model.ref.split(":")
    model_file = broken / name / version / "model.keras"
    model_file.write_bytes(model_file.read_bytes()[:-100] + b"\0" * 100)
    stores = f'{{"archive": "{archive}", "broken": "{broken}"}}'
    monkeypatch.setenv("ALLSCORE_MODEL_STORES", stores)
    reset_settings_cache()
    cells = [str(p) for p in write_sample(tmp_path / "slide", 4, 0.3, size=64)]
    worker = stack.start_worker(concurrency=1, ALLSCORE_MODEL_STORES=stores)

    with pytest.raises(SubmitError, match="not one the workers know"):
        submit_samples({"S-x": cells}, model_ref=stack.model.ref, store=str(tmp_path), settings=get_settings())
    # The corrupt copy first: the cache holds nothing yet that matches the manifest's sha256.
    bad = submit_samples({"S-broken": cells}, model_ref=stack.model.ref, store=str(broken), settings=get_settings())
    failed = stack.wait_final(bad, 1, 90)["S-broken"]
    assert failed["status"] == "failed" and "sha256" in failed["error"], failed
    good = submit_samples({"S-archive": cells}, model_ref=stack.model.ref, store="archive", settings=get_settings())
    assert stack.wait_final(good, 1, 90)["S-archive"]["status"] == "done"
    assert f"{stack.model.ref} in pid" in worker.log() and "from store archive" in worker.log()


@pytest.mark.timeout(180)
def test_a_submit_that_fails_half_way_is_retried_with_the_same_job_id(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import get_settings
    from trainer.synth import write_sample
    from worker.celery_app import app

    cells = [str(p) for p in write_sample(tmp_path / "slide", 4, 0.3, size=64)]
    samples = {f"S-half-{i}": cells for i in range(3)}
    real_send = app.send_task
    sent: list[str] = []

    def broker_drops_after_one(*args: Any, **kwargs: Any) -> Any:
        # The broker takes one message and then goes away (what a Redis restart mid-submit looks like here).
        if sent:
            raise ConnectionError("Connection reset by peer")
        sent.append(kwargs["kwargs"]["sample_id"])
        return real_send(*args, **kwargs)

    monkeypatch.setattr(app, "send_task", broker_drops_after_one)
    with pytest.raises(SubmitError, match="1 of 3 samples were queued"):
        submit_samples(samples, model_ref=stack.model.ref, job_id="job-half", settings=get_settings())
    rows = stack.rows("job-half")
    assert sorted(r["status"] for r in rows.values()) == ["failed", "failed", "queued"]
    monkeypatch.setattr(app, "send_task", real_send)

    # The same job id and samples again: a retry, not a clash; every sample goes out with a new submission.
    assert submit_samples(samples, model_ref=stack.model.ref, job_id="job-half", settings=get_settings()) == "job-half"
    with pytest.raises(JobExistsError, match="exists already with other samples"):
        submit_samples({"S-other": cells}, model_ref=stack.model.ref, job_id="job-half", settings=get_settings())
    worker = stack.start_worker(concurrency=1)
    final = stack.wait_final("job-half", 3, 120)
    assert {r["status"] for r in final.values()} == {"done"}
    wait_until(lambda: stack.broker_keys() == {"queued": 0, "unacked": 0}, 60, "every message to be consumed")
    # The first try's message for the sample it did queue was superseded: it wrote nothing.
    assert "stale delivery, nothing written" in worker.log()
    assert stack.duplicate_cells() == 0


@pytest.mark.timeout(240)
def test_a_sample_that_kills_its_worker_again_and_again_is_failed_not_redelivered_forever(stack: Stack) -> None:
    import signal

    from tests.integration.stack import children

    prefix = stack.upload_sample("slide-poison", 8)
    s3 = stack.s3_proxy()
    worker = stack.start_worker(
        concurrency=1, ALLSCORE_S3_ENDPOINT_URL=f"http://{s3.url_host}", ALLSCORE_MAX_WORKER_DEATHS="2"
    )
    # Frozen S3: every start hangs on the first image, and the test kills the worker child there, as an
    # out-of-memory kill would, each time the sample is redelivered.
    s3.freeze()
    job = stack.submit({"slide-poison": [prefix]})
    assert worker.proc is not None
    for attempt in (1, 2):
        wait_until(
            lambda attempt=attempt: (
                stack.sample("slide-poison")["attempts"] == attempt
                and stack.sample("slide-poison")["status"] == "running"
            ),
            90,
            f"start {attempt}",
        )
        (child,) = children(worker.proc.pid)
        os.kill(child, signal.SIGKILL)
        wait_until(lambda child=child: child not in children(worker.proc.pid), 30, "the child to go")
    row = stack.wait_final(job, 1, 120)["slide-poison"]
    s3.thaw()
    assert row["status"] == "failed" and "the worker died 2 times on this sample" in row["error"], row
    assert stack.sample("slide-poison")["attempts"] == 3
    wait_until(lambda: stack.broker_keys() == {"queued": 0, "unacked": 0}, 60, "nothing left to redeliver")


@pytest.mark.timeout(180)
def test_the_sweeper_fails_samples_lost_from_the_broker_or_stuck_running_and_nothing_else(
    stack: Stack, tmp_path: Path
) -> None:
    import redis
    from typer.testing import CliRunner

    from allscore.cli import app
    from trainer.synth import write_sample

    cells = [str(p) for p in write_sample(tmp_path / "slide", 4, 0.3, size=64)]
    lost = stack.submit({"S-lost": cells})
    client = redis.Redis.from_url(stack.redis_url)
    client.delete(stack.queue)  # a flushed Redis: the message is gone, the row still says queued
    client.close()
    alive = stack.submit({"S-alive": cells})
    stuck_job, _ = _enqueue(stack, "S-stuck")
    with stack.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE samples SET submitted_at = submitted_at - interval '1 hour'")
        conn.exec_driver_sql(
            "UPDATE samples SET status = 'running', started_at = now() - interval '3 hours' WHERE sample_id = 'S-stuck'"
        )
    dry = CliRunner().invoke(app, ["sweep", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert _row(stack, "S-lost")["status"] == "queued", "a dry run changes nothing"

    result = CliRunner().invoke(app, ["sweep"])
    assert result.exit_code == 0, result.output
    assert sorted(result.stdout.split()) == ["S-lost", "S-stuck"]
    assert "no longer on the broker" in _row(stack, "S-lost")["error"]
    assert "hard time limit" in _row(stack, "S-stuck")["error"]
    assert _row(stack, "S-alive")["status"] == "queued", "a sample whose message waits on the broker is left alone"
    stack.start_worker(concurrency=1)
    assert stack.wait_final(alive, 1, 90)["S-alive"]["status"] == "done"
    assert stack.rows(lost)["S-lost"]["status"] == "failed" and stuck_job


@pytest.mark.timeout(180)
def test_big_samples_are_refused_at_submit_or_fail_with_the_reason(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.settings import get_settings, reset_settings_cache
    from trainer.synth import write_sample

    cells = [str(p) for p in write_sample(tmp_path / "slide", 5, 0.3, size=64)]
    monkeypatch.setenv("ALLSCORE_MAX_IMAGES_PER_SAMPLE", "4")
    reset_settings_cache()
    with pytest.raises(SubmitError, match="has 5 images; the limit is 4"):
        submit_samples({"S-big": cells}, model_ref=stack.model.ref, settings=get_settings())
    assert stack.query("SELECT count(*) AS n FROM samples WHERE sample_id = 'S-big'")[0]["n"] == 0

    # A field sample whose fields hold more cells than the workers allow fails with the reason.
    bccd = Path(__file__).resolve().parents[1] / "data" / "bccd" / "JPEGImages"
    fields = [str(p) for p in sorted(bccd.glob("*.jpg"))[:3]]
    stack.start_worker(concurrency=1, ALLSCORE_MAX_CELLS_PER_SAMPLE="1")
    monkeypatch.setenv("ALLSCORE_MAX_IMAGES_PER_SAMPLE", "100")
    reset_settings_cache()
    job = submit_samples({"S-many": fields}, model_ref=stack.model.ref, kind="fields", settings=get_settings())
    row = stack.wait_final(job, 1, 120)["S-many"]
    assert row["status"] == "failed" and "hold more than 1 cells" in row["error"], row
    assert stack.cell_count("S-many") == 0


@pytest.mark.timeout(180)
def test_a_sample_past_the_soft_time_limit_fails_with_the_reason_and_nothing_partial(stack: Stack) -> None:
    prefix = stack.upload_sample("slide-slow", 16)
    s3 = stack.s3_proxy()
    stack.start_worker(
        concurrency=1,
        ALLSCORE_S3_ENDPOINT_URL=f"http://{s3.url_host}",
        ALLSCORE_TASK_SOFT_TIME_LIMIT="3",
        ALLSCORE_TASK_TIME_LIMIT="60",
    )
    s3.freeze()  # every read hangs: the sample cannot finish in 3 s
    job = stack.submit({"slide-slow": [prefix]})
    row = stack.wait_final(job, 1, 120)["slide-slow"]
    s3.thaw()
    assert row["status"] == "failed" and "time limit exceeded" in row["error"], row
    assert (row["n_cells"], stack.cell_count("slide-slow")) == (None, 0)
