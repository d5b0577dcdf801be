"""Cancelling samples on real parts (PostgreSQL, Redis, an S3 server, prefork workers): a queued sample is never
run, a running one stops at its next batch, neither writes a result; `allscore status --json`, `allscore cancel`
and worker.client.wait_for_job as a lab pipeline uses them."""

from __future__ import annotations

import json
import subprocess
import urllib.request

import pytest

from tests.harness.cli import run_allscore
from tests.harness.faults import free_port, wait_until
from tests.integration.stack import Stack
from worker.client import JobTimeout, wait_for_job

pytestmark = pytest.mark.integration


def allscore(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a lab pipeline runs it, with the test's settings (the stack's environment)."""
    return run_allscore(*args, check=False, timeout=120)


@pytest.mark.timeout(300)
def test_a_queued_sample_is_never_run_and_a_running_one_stops(stack: Stack) -> None:
    kept = stack.upload_sample("kept", 6, seed=1)
    stopped = stack.upload_sample("stopped", 40, seed=2)
    never = stack.upload_sample("never", 6, seed=3)
    # No worker yet: everything waits on the queue. Cancelling one leaves nothing for a worker to run.
    job = stack.submit({"kept": [kept], "never": [never]})
    run = allscore("cancel", "never")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\t")[0] == "never" and "was queued" in run.stdout
    status = allscore("status", "--job", job, "--json")
    assert status.returncode == 0, status.stderr
    assert {r["sample_id"]: r["status"] for r in json.loads(status.stdout)} == {"kept": "queued", "never": "cancelled"}
    with pytest.raises(JobTimeout) as timed_out:
        wait_for_job(job, timeout=1, poll=0.2)
    assert {r["sample_id"] for r in timed_out.value.rows} == {"kept", "never"}

    # A worker that reads the S3 store through a proxy the test freezes: "stopped" starts, then hangs on its images.
    s3 = stack.s3_proxy()
    port = free_port()
    worker = stack.start_worker(
        concurrency=1,
        ALLSCORE_S3_ENDPOINT_URL=f"http://{s3.url_host}",
        ALLSCORE_BATCH_SIZE="4",
        ALLSCORE_METRICS_PORT=str(port),
    )
    rows = {r["sample_id"]: r for r in wait_for_job(job, timeout=120)}
    assert (rows["kept"]["status"], rows["kept"]["n_cells"]) == ("done", 6)
    assert (rows["never"]["status"], rows["never"]["n_cells"], rows["never"]["error"]) == (
        "cancelled",
        None,
        "cancelled",
    )
    assert stack.cell_count("never") == 0 and stack.sample("never")["attempts"] == 0  # never started
    assert "cancelled, stopped; nothing written" in worker.log()
    # Text logs (the default) are free of TensorFlow's native start-up lines too.
    assert not any(word in worker.log() for word in ("cuInit", "oneDNN custom operations", "absl::InitializeLog"))

    s3.freeze()
    job2 = stack.submit({"stopped": [stopped]})
    wait_until(lambda: stack.sample("stopped")["status"] == "running", 60, "the sample to start")
    run = allscore("cancel", "--job", job2)
    assert run.returncode == 0, run.stderr
    assert "was running" in run.stdout
    s3.thaw()
    (row,) = wait_for_job(job2, timeout=60)
    assert (row["status"], row["n_cells"], row["error"]) == ("cancelled", None, "cancelled")
    wait_until(lambda: worker.log().count("cancelled, stopped; nothing written") == 2, 60, "the worker to stop it")
    assert stack.cell_count("stopped") == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    assert 'allscore_samples_total{outcome="cancelled"} 2.0' in text
    assert 'allscore_samples_by_status{status="cancelled"} 2.0' in text
    # The worker goes on: the next sample is scored.
    job3 = stack.submit({"kept": [kept]})
    (row,) = wait_for_job(job3, timeout=120)
    assert row["status"] == "done"

    # Nothing left to cancel, or nothing by that name: exit 3, and the reason.
    run = allscore("cancel", "--job", job2)
    assert run.returncode == 4 and "nothing to cancel" in run.stderr
    run = allscore("cancel", "no-such-sample")
    assert run.returncode == 4 and "no such sample" in run.stderr
    run = allscore("status", "no-such-sample", "--json")
    assert run.returncode == 4
