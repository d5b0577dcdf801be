"""What an operator watches, on real parts: a prefork worker's Prometheus metrics scraped over HTTP after it
scored samples, its health check live and dead, and its JSON logs."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.runtimes import openvino_available
from core.storage import store_for
from tests.harness.faults import free_port, wait_until
from tests.integration.stack import Stack
from worker.health import check as health_check

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the worker's /metrics, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_scraped_from_a_worker_count_what_it_scored(stack: Stack, tmp_path: Path) -> None:
    port = free_port()
    # The defaults for runtime and precision (auto): what this CPU and the version's exports call for.
    worker = stack.start_worker(
        concurrency=2,
        ALLSCORE_METRICS_PORT=str(port),
        ALLSCORE_LOG_FORMAT="json",
        ALLSCORE_PRECISION="auto",
        ALLSCORE_RUNTIME="auto",
    )
    a = stack.upload_sample("metrics-a", 12, seed=1)
    b = stack.upload_sample("metrics-b", 8, seed=2)
    bad = tmp_path / "broken.bmp"
    bad.write_bytes(b"BM not really a bitmap")
    store_for(stack.bucket).upload(bad, f"{a}broken.bmp")
    job = stack.submit({"metrics-a": [a], "metrics-b": [b]})
    rows = stack.wait_final(job, 2, timeout=180)
    assert {s: (r["status"], r["n_cells"], r["n_failed"]) for s, r in rows.items()} == {
        "metrics-a": ("done", 13, 1),
        "metrics-b": ("done", 8, 0),
    }

    m = scrape(port)
    assert m[("allscore_cells_scored_total", ())] == 20
    assert m[("allscore_cells_failed_total", ())] == 1
    assert m[("allscore_samples_total", (("outcome", "done"),))] == 2
    assert ("allscore_samples_total", (("outcome", "failed"),)) not in m
    # Batches of 16 (the stack's ALLSCORE_BATCH_SIZE): 12 cells make one batch, 8 another.
    assert m[("allscore_batch_seconds_count", ())] == 2
    assert m[("allscore_read_seconds_count", ())] == 21  # every image read, the broken one too
    assert m[("allscore_read_seconds_sum", ())] > 0
    # Each of the two processes that took a sample loaded the model once; both may have taken one. The version has
    # an ONNX export and no int8 one: auto serves bfloat16 on a CPU that computes it (with OpenVINO where it is
    # installed, else TensorFlow), else the export in float32 with ONNX Runtime. The loads say which.
    flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
    bf16_runtime = "openvino" if openvino_available() else "tensorflow"
    precision, runtime = (
        ("bfloat16", bf16_runtime) if {"avx512_bf16", "amx_bf16"} & set(flags) else ("float32", "onnxruntime")
    )
    labels = (("precision", precision), ("runtime", runtime))
    assert [k for k in m if k[0] == "allscore_model_loads_total"] == [("allscore_model_loads_total", labels)]
    loads = m[("allscore_model_loads_total", labels)]
    assert loads == sum(worker.model_loads().values()) and 1 <= loads <= 2
    assert m[("allscore_model_load_seconds_count", ())] == loads
    assert m[("allscore_sample_cells_per_second", ())] > 0
    # Read at the scrape: the queue this worker consumes is empty; the database holds two done samples.
    assert m[("allscore_queue_length", (("queue", stack.queue),))] == 0
    assert m[("allscore_samples_by_status", (("status", "done"),))] == 2
    assert m[("allscore_samples_by_status", (("status", "queued"),))] == 0
    assert m[("allscore_exporter_source_up", (("source", "broker"),))] == 1
    assert m[("allscore_exporter_source_up", (("source", "database"),))] == 1
    assert m[("allscore_worker_consuming", ())] == 1

    # JSON logs: every line after Celery's start-up banner is one object; the scoring lines carry the ids.
    lines = worker.log().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("{"))
    records = [json.loads(line) for line in lines[first:] if line.strip()]
    assert {"ts", "level", "logger", "message", "pid"} <= set(records[0])
    scored = [r for r in records if r["message"].startswith("sample metrics-a:")]
    assert scored and all(r["job_id"] == job and r["sample_id"] == "metrics-a" for r in scored)
    assert any(r["message"].startswith("model loaded:") for r in records)
    # TensorFlow's native start-up lines (CUDA probing, oneDNN) are kept out of the log.
    assert not any(word in worker.log() for word in ("cuInit", "oneDNN custom operations", "absl::InitializeLog"))


def test_health_check_passes_on_a_live_worker_and_fails_on_a_stopped_or_cut_off_one(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    redis_port = int(stack.redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = stack.proxy(redis_port)
    stack.use_broker(f"redis://{proxy.url_host}/0", monkeypatch)
    port = free_port()
    worker = stack.start_worker(
        concurrency=1,
        ALLSCORE_METRICS_PORT=str(port),
        ALLSCORE_HEALTH_MAX_AGE="8",
        ALLSCORE_LOG_FORMAT="json",
        ALLSCORE_TF_THREADS="1",
    )
    assert worker.proc is not None
    assert "worker processes 1, each with 1 TensorFlow threads and" in worker.log()
    wait_until(lambda: health_check(port)[0], 15, "the first beat of the consumer's loop")
    healthy, said = health_check(port)
    assert healthy, said
    assert json.loads(said)["queues"] == [stack.queue]
    # The check as compose and the Dockerfile run it.
    env = {**os.environ, "ALLSCORE_METRICS_PORT": str(port)}
    run = subprocess.run([sys.executable, "-m", "worker.health"], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr

    # The broker goes away: the consumer stops consuming, and the check says so.
    proxy.down()
    wait_until(lambda: not health_check(port)[0], 60, "the health check to fail without the broker")
    proxy.up()
    wait_until(lambda: health_check(port)[0], 90, "the health check to pass once the broker is back")

    # A frozen worker (docker pause, a hung process) does not answer in time.
    os.kill(worker.proc.pid, signal.SIGSTOP)
    try:
        assert not health_check(port, timeout=3)[0]
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
    wait_until(lambda: health_check(port)[0], 30, "the health check to pass again")

    worker.stop()
    run = subprocess.run([sys.executable, "-m", "worker.health"], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 1
    assert "no answer" in run.stderr


def test_a_worker_whose_metrics_port_is_taken_says_so_and_exits(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = {**os.environ, "ALLSCORE_HOME": str(tmp_path / "home"), "ALLSCORE_METRICS_PORT": str(port)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        run = subprocess.run(
            [sys.executable, "-m", "allscore", "worker", "--concurrency", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert run.returncode == 3, run.stderr[-2000:]
    assert f"port {port}" in " ".join(run.stderr.split()) and "Traceback" not in run.stderr
