"""allscore_submitter (migration 0008) on PostgreSQL: a lab pipeline's whole job, and nothing else."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from db import notifications
from db import repository as repo
from db.engine import make_engine, session_factory, transaction
from db.migrate import upgrade
from tests.harness.db import assert_denied, cells_of, make_cells, register_model, role_engine, score
from tests.harness.services import upgrade_with_new_passwords

pytestmark = pytest.mark.integration


def test_submitter_role_submits_reads_cancels_and_nothing_else(
    pg_empty_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (password,) = upgrade_with_new_passwords(pg_empty_url, monkeypatch, "ALLSCORE_SUBMITTER_DB_PASSWORD").values()
    owner = make_engine(pg_empty_url)
    with owner.connect() as conn:
        assert conn.execute(text("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'allscore_submitter'")).scalar()
    submitter = role_engine(pg_empty_url, "allscore_submitter", password)
    sessions = session_factory(submitter)
    try:
        # What submit_samples does: register the model, the job and its queued samples, in one transaction.
        def submit(job: str, samples: list[str]) -> dict[str, int]:
            with transaction(sessions) as s:
                register_model(s)
                repo.create_job(session=s, job_id=job, n_samples=len(samples), retry_of=[(x, "cnn:1") for x in samples])
                return {
                    x: repo.enqueue_sample(session=s, job_id=job, sample_id=x, model_version="cnn:1").submission
                    for x in samples
                }

        submitted = submit("job-s", ["S1", "S2", "S3"])
        score(session_factory(owner), "S1", "cnn:1", make_cells("s3://lab/S1", [0.9, 0.2]))
        # The broker refused part of a submission: the samples not queued are failed, as the submitter.
        with transaction(sessions) as s:
            repo.mark_failed(
                session=s,
                sample_id="S3",
                model_version="cnn:1",
                error="could not be queued",
                delivery=repo.Delivery("job-s", submitted["S3"]),
            )
        # status and report read the views; cancel ends what is left.
        with sessions() as s:
            rows = {r["sample_id"]: r["status"] for r in repo.get_sample_results(session=s, job_id="job-s")}
            assert rows == {"S1": "done", "S2": "queued", "S3": "failed"}
            assert len(repo.get_cell_results(session=s, sample_id="S1")) == 2
            s.execute(text("SELECT count(*) FROM sample_reviews")).scalar()
        with transaction(sessions) as s:
            assert [c.sample_id for c in repo.cancel_samples(session=s, job_id="job-s")] == ["S2"]
        # Resubmitting a scored sample (the same job id retries it) clears its cells.
        submit("job-s", ["S1", "S2", "S3"])
        assert cells_of(session_factory(owner), "S1", "cnn:1") == []
        assert_denied(
            submitter,
            [
                "INSERT INTO cells (sample_pk, image_uri, scored_at) VALUES (1, 'x', now())",
                "UPDATE cells SET p_all = 1",
                "DELETE FROM jobs",
                "DELETE FROM samples",
                "UPDATE models SET threshold = 0",
                "SELECT * FROM review_users",
                "INSERT INTO sample_signoffs (sample_id, model_version, reviewer, comment, signed_at) "
                "VALUES ('S1', 'cnn:1', 'x', '', now())",
                "DROP TABLE cells",
                "CREATE TABLE submitter_scratch (x int)",
            ],
        )
    finally:
        submitter.dispose()
        owner.dispose()


def test_worker_role_claims_and_records_callbacks_and_reads_nothing_else_of_jobs(pg_empty_url: str) -> None:
    upgrade(pg_empty_url)
    owner = make_engine(pg_empty_url)
    worker = role_engine(pg_empty_url, "allscore_worker")
    try:
        with transaction(session_factory(owner)) as s:
            repo.create_job(session=s, job_id="job-n", n_samples=1, notify_url="http://127.0.0.1:9/x")
            repo.enqueue_sample(session=s, job_id="job-n", sample_id="N1", model_version="cnn:1")
        sessions = session_factory(worker)
        with transaction(sessions) as s:
            assert notifications.claim_notification(session=s, job_id="job-n") is None  # N1 has not ended
        score(session_factory(owner), "N1", "cnn:1", make_cells("s3://lab/N1", [0.9]))
        with sessions() as s:
            assert notifications.jobs_to_notify(session=s) == ["job-n"]
            assert [x["status"] for x in notifications.job_summary(session=s, job_id="job-n")] == ["done"]
        with transaction(sessions) as s:
            assert notifications.claim_notification(session=s, job_id="job-n") == "http://127.0.0.1:9/x"
            notifications.record_notification(session=s, job_id="job-n", status="delivered: HTTP 204 after 1 tries")
        with transaction(sessions) as s:
            assert notifications.claim_notification(session=s, job_id="job-n") is None  # once
        # A claim left `sending` by a process that died is taken again once it is stale, and only then.
        with transaction(session_factory(owner)) as s:
            repo.create_job(session=s, job_id="job-d", n_samples=0, notify_url="http://127.0.0.1:9/d")
        with transaction(sessions) as s:
            assert notifications.claim_notification(session=s, job_id="job-d") == "http://127.0.0.1:9/d"
        with transaction(sessions) as s:
            assert notifications.claim_notification(session=s, job_id="job-d") is None
        with owner.begin() as conn:
            conn.execute(text("UPDATE jobs SET notified_at = notified_at - interval '20 minutes' WHERE id = 'job-d'"))
        with sessions() as s:
            assert notifications.jobs_to_notify(session=s) == ["job-d"]
        with transaction(sessions) as s:
            assert notifications.claim_notification(session=s, job_id="job-d") == "http://127.0.0.1:9/d"
        assert_denied(worker, ["SELECT * FROM jobs", "UPDATE jobs SET notify_url = 'http://evil/'", "DELETE FROM jobs"])
    finally:
        worker.dispose()
        owner.dispose()
