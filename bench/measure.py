"""The measurements, each a small function the steps of bench/run.py call: the raw model, fetch and decode alone,
the naive loop, the worker's engine end to end, PostgreSQL's row rate, the memory soak, and real worker processes
through Redis."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Fetch, cpu_seconds, rss_mb, set_env


def bench_raw(model: Any, size: int, batch: int, seconds: float) -> tuple[float, float]:
    """Batched model(x, training=False) on pre-decoded uint8 batches: cells/s and CPU ms per cell."""
    from core.inference import predict_batch

    x = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    predict_batch(model, x)
    done, start, cpu = 0, time.perf_counter(), cpu_seconds()
    while time.perf_counter() - start < seconds:
        done += len(predict_batch(model, x))
    return done / (time.perf_counter() - start), (cpu_seconds() - cpu) / done * 1e3


def bench_loads(uris: list[str], fetch: Fetch, size: int) -> float:
    """CPU ms per cell to fetch and decode, on the engine's I/O pool, with no model running."""
    from worker.fields import read_cell

    with ThreadPoolExecutor(_io_threads()) as pool:
        list(pool.map(lambda uri: read_cell(uri, fetch, size=size, max_pixels=40_000_000), uris[:100]))
        cpu = cpu_seconds()
        for _ in pool.map(lambda uri: read_cell(uri, fetch, size=size, max_pixels=40_000_000), uris):
            pass
        return (cpu_seconds() - cpu) / len(uris) * 1e3


def bench_stain_norm(uris: list[str], fetch: Fetch, size: int, batch: int) -> tuple[float, float]:
    """Per-sample stain normalisation (core/stainnorm.py) at the model's size: CPU ms per cell to move a batch onto
    a target, and CPU ms to fit a sample's statistics on its first FIT_CELLS cells (once per sample)."""
    from core.stainnorm import FIT_CELLS, fit, normalise
    from worker.fields import read_cell

    read = [read_cell(uri, fetch, size=size, max_pixels=40_000_000).items[0].image for uri in uris[:FIT_CELLS]]
    cells = np.stack([image for image in read if image is not None])
    target = fit(cells[::2])
    cpu = cpu_seconds()
    source = fit(cells)
    fit_ms = (cpu_seconds() - cpu) * 1e3
    batches = [cells[i : i + batch] for i in range(0, len(cells) - batch + 1, batch)] * 4
    normalise(batches[0], source, target)
    cpu = cpu_seconds()
    for x in batches:
        normalise(x, source, target)
    return (cpu_seconds() - cpu) / sum(len(x) for x in batches) * 1e3, fit_ms


def bench_naive(model: Any, images: list[Path], size: int, n: int) -> float:
    """model.predict on one image at a time, decoding each: what a notebook loop does."""
    from core.imaging import load_image

    start = time.perf_counter()
    for path in images[:n]:
        model.predict(load_image(path, size)[None], verbose=0)
    return n / (time.perf_counter() - start)


def bench_engine(
    loaded: Any,
    uris: list[str],
    fetch: Fetch,
    db_url: str,
    batch: int,
    kind: str = "cells",
    um_per_px: float | None = None,
) -> dict[str, Any]:
    """The worker's engine end to end (fetch + decode [+ segment] + infer + database write), in this process.

    cells_per_s counts the cells scored: every image for single cells, the whole lymphoid cells found for fields.
    """
    from core.contract import ScoreMessage
    from db import repository
    from db.engine import make_engine, session_factory, transaction
    from db.migrate import upgrade
    from worker.engine import score_sample

    upgrade(db_url)
    sessions = session_factory(make_engine(db_url))
    sample = f"bench-{uuid.uuid4().hex[:8]}"
    with transaction(sessions) as session:
        repository.ensure_model(
            session=session,
            name=loaded.manifest.name,
            version=loaded.manifest.version,
            uri="bench",
            sha256=loaded.manifest.sha256,
            sensitivity=loaded.manifest.validation.sensitivity,
            specificity=loaded.manifest.validation.specificity,
            threshold=loaded.manifest.threshold,
        )
        repository.create_job(session=session, job_id=sample, n_samples=1)
        queued = repository.enqueue_sample(
            session=session, job_id=sample, sample_id=sample, model_version=loaded.manifest.ref, kind=kind
        )
    message = ScoreMessage(
        job_id=sample,
        sample_id=sample,
        image_uris=tuple(uris),
        model_version=loaded.manifest.ref,
        submission=queued.submission,
        kind=kind,  # type: ignore[arg-type]
        um_per_px=um_per_px,
    )
    with ThreadPoolExecutor(_io_threads()) as pool:
        start = time.perf_counter()
        summary = score_sample(message, loaded=loaded, fetch=fetch, sessions=sessions, pool=pool, batch_size=batch)
        seconds = time.perf_counter() - start
    scored = summary.n_cells - summary.n_failed
    return {
        "images": len(uris),
        "cells": scored,
        "seconds": round(seconds, 2),
        "cells_per_s": round(scored / seconds, 1),
        "all_fraction": summary.all_fraction,
    }


def _io_threads() -> int:
    """The fetch/decode threads a worker process would use (ALLSCORE_IO_THREADS or its default)."""
    from core.settings import get_settings
    from worker.context import io_threads_for

    return io_threads_for(get_settings())


def paired_ratios(
    raw_model: Any, loaded: Any, uris: list[str], fetch: Fetch, db_url: str, args: argparse.Namespace, pairs: int = 3
) -> list[float]:
    """End to end (local store, PostgreSQL) over raw, each from a raw run just before its engine run."""
    ratios = []
    for _ in range(pairs):
        raw, _cpu = bench_raw(raw_model, args.size, args.batch, 5)
        ratios.append(round(bench_engine(loaded, uris, fetch, db_url, args.batch)["cells_per_s"] / raw, 3))
    return ratios


def bench_pg_rows(db_url: str, n: int = 20000) -> float:
    """Cell rows per second into PostgreSQL (one sample, one transaction, bulk insert)."""
    from core.contract import CellResult, SampleSummary
    from db import repository
    from db.engine import make_engine, session_factory, transaction

    sessions = session_factory(make_engine(db_url))
    with transaction(sessions) as session:
        repository.create_job(session=session, job_id="rows", n_samples=1)
        repository.enqueue_sample(session=session, job_id="rows", sample_id="rows", model_version="bench:rows")
        repository.mark_running(session=session, sample_id="rows", model_version="bench:rows")
    cells = [CellResult(f"s3://b/cells/{i:06d}.bmp", 0.3, False, None) for i in range(n)]
    summary = SampleSummary(n, 0, 0, 0.0, 0.0, 0.01, 0.0, 0.3, ())
    start = time.perf_counter()
    with transaction(sessions) as session:
        repository.record_sample_result(
            session=session, sample_id="rows", model_version="bench:rows", cells=cells, summary=summary
        )
    return n / (time.perf_counter() - start)


def soak_memory(loaded: Any, uris: list[str], fetch: Fetch, batch: int, total: int) -> dict[str, Any]:
    """Score `total` cells through the engine's batching path; RSS sampled every 1,000 cells."""
    from worker.engine import score_cells, stain_target

    samples: list[tuple[int, float]] = []
    done = 0
    with ThreadPoolExecutor(_io_threads()) as pool:
        while done < total:
            chunk = uris[: min(1000, total - done)]
            score_cells(
                chunk,
                model=loaded.model,
                size=loaded.manifest.input_size,
                threshold=loaded.manifest.threshold,
                fetch=fetch,
                pool=pool,
                batch_size=batch,
                stain=stain_target(loaded.manifest),
            )
            done += len(chunk)
            samples.append((done, rss_mb()[0]))
    first = samples[min(1, len(samples) - 1)][1]  # after the first 1,000: caches and graphs are warm
    return {
        "cells": done,
        "rss_mb": [round(r, 1) for _, r in samples],
        "growth_mb_after_warmup": round(samples[-1][1] - first, 1),
        "peak_mb": round(rss_mb()[1], 1),
    }


def run_workers(
    specs: list[tuple[str | None, int, int]], env: dict[str, str], uris: list[str], ref: str, work: Path, n_samples: int
) -> dict[str, Any]:
    """Start workers (cpu list or None, concurrency, tf threads), warm them, score n_samples through Redis."""
    from sqlalchemy import text

    from db.engine import make_engine

    queue = f"bench-{uuid.uuid4().hex[:8]}"
    procs = []
    logs = []
    for i, (cpus, concurrency, threads) in enumerate(specs):
        log_path = work / f"worker-{queue}-{i}.log"
        logs.append(log_path)
        cmd = [sys.executable, "-m", "allscore", "worker", f"--concurrency={concurrency}"]
        if cpus is not None:
            cmd = ["taskset", "-c", cpus, *cmd]
        worker_env = {
            **os.environ,
            **env,
            "ALLSCORE_QUEUE": queue,
            "ALLSCORE_TF_THREADS": str(threads),
            "PYTHONUNBUFFERED": "1",
        }
        procs.append(
            subprocess.Popen(
                cmd, env=worker_env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
            )
        )
    try:
        deadline = time.monotonic() + 120
        while not all("ready." in p.read_text(errors="replace") for p in logs if p.exists()) or len(
            [p for p in logs if p.exists()]
        ) < len(logs):
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not start")
            time.sleep(0.5)
        set_env(**env, ALLSCORE_QUEUE=queue)
        from worker.cli import wait_for_job
        from worker.client import submit_samples

        # Warm-up: one sample per worker process so every process has loaded the model.
        n_processes = sum(c for _, c, _ in specs)
        warm = submit_samples({f"warm-{queue}-{i}": uris[:64] for i in range(n_processes * 2)}, model_ref=ref)
        wait_for_job(warm, n_processes * 2, 300)
        per = len(uris) // n_samples
        job = submit_samples({f"s-{queue}-{i}": uris[i * per : (i + 1) * per] for i in range(n_samples)}, model_ref=ref)
        rows = wait_for_job(job, n_samples, 900)
        engine = make_engine(env["ALLSCORE_DATABASE_URL"])
        with engine.connect() as conn:
            first, last = conn.execute(
                text("SELECT min(started_at), max(finished_at) FROM sample_results WHERE job_id = :j"), {"j": job}
            ).one()
        engine.dispose()
        cells = sum(r["n_cells"] or 0 for r in rows)
        seconds = (last - first).total_seconds()
        child_rss = []
        for p in procs:
            for child in _children(p.pid):
                child_rss.append(round(rss_mb(child)[1], 1))
        loads = [len(re.findall(r"model loaded:", p.read_text(errors="replace"))) for p in logs]
        load_times = [float(t) for p in logs for t in re.findall(r"model loaded: .* \(([\d.]+)s\)", p.read_text())]
        return {
            "cells": cells,
            "seconds": round(seconds, 2),
            "cells_per_s": round(cells / seconds, 1),
            "processes": n_processes,
            "model_loads": sum(loads),
            "load_seconds": load_times,
            "peak_rss_mb_per_process": child_rss,
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)


def _children(pid: int) -> list[int]:
    """The pids of a process's children, and theirs (a prefork worker's pool processes)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        for c in children:
            out.append(int(c))
            out.extend(_children(int(c)))
    return out
