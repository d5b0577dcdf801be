"""`make bench`: allscore's throughput, measured in one run with one model on one machine.

Writes bench/results/latest.json and bench/results/latest.md. Never part of the test suite. Needs the local
PostgreSQL and Redis (as the tests do); starts its own S3 server (moto, as a subprocess).
Run: python -m bench.run [--cells 2000] [--soak 10000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from tests.harness.services import moto_server_process
from worker.context import available_cores

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
REDIS = os.environ.get("ALLSCORE_BENCH_REDIS", "redis://127.0.0.1:6379/0")

# What worker.engine reads objects with (worker.engine.Fetch).
Fetch = Callable[[str], bytes]


def log(msg: str) -> None:
    """Progress on stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "unknown"
    flags: list[str] = []
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.+)", text).group(1)  # type: ignore[union-attr]
        # VMs often hide the model name ("AMD EPYC"); family and model still tell the generations apart
        # (family 25 is Zen 3/4, 26 is Zen 5), and the speed of the same code differs by 2x between them.
        family = re.search(r"cpu family\s*:\s*(\d+)", text)
        model = re.search(r"^model\s*:\s*(\d+)", text, re.MULTILINE)
        if family and model:
            cpu = f"{cpu} (family {family.group(1)}, model {model.group(1)})"
        flags = sorted({f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in text.split()})
    except (OSError, AttributeError):
        pass
    import keras
    import tensorflow as tf

    return {
        "cpu": cpu,
        "cores": available_cores(),
        "flags": flags,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def model_gflop(model: Any) -> float:
    """Forward-pass GFLOP per cell (2 x multiply-adds of Conv2D and Dense layers)."""
    from keras import layers

    flops = 0
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            c_in = layer.input.shape[-1]
            flops += 2 * h * w * c_out * kh * kw * c_in
        elif isinstance(layer, layers.Dense):
            flops += 2 * layer.input.shape[-1] * layer.units
    return flops / 1e9


def rss_mb(pid: int | None = None) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB, from /proc."""
    status = Path(f"/proc/{pid or 'self'}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    return rss, hwm


@contextmanager
def pg_database() -> Iterator[str]:
    """A throwaway PostgreSQL database (tests.harness.services), migrated."""
    from db.migrate import upgrade
    from tests.harness.services import pg_admin_url_from_env, throwaway_database

    with throwaway_database(pg_admin_url_from_env()) as url:
        upgrade(url)
        yield url


def set_env(**values: str) -> None:
    """Point settings at new values (environment + cache reset)."""
    from core.settings import reset_settings_cache

    os.environ.update(values)
    reset_settings_cache()


# --- the model --------------------------------------------------------------------------------------------


def train_bench_model(work: Path, size: int, epochs: int) -> str:
    """A `seed` model at `size` trained briefly on synthetic cells (for the bf16 accuracy check)."""
    from rich.console import Console

    from trainer.synth import synthesize
    from trainer.train import TrainConfig, publish, train_model

    data = work / "train-data"
    synthesize(data, subjects=12, cells=120, seed=7)
    store = str(work / "models")
    config = TrainConfig(name="bench", arch="seed", image_size=size, epochs=epochs, patience=epochs, version="v1")
    outcome = train_model(data, config, Console(stderr=True))
    publish(outcome, store)
    return store


# --- the measurements -------------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time (user + system) of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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
    from db import repository
    from db.engine import make_engine, session_factory, transaction
    from db.records import CellResult, SampleSummary

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
    from worker.engine import score_cells

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


# --- the run ----------------------------------------------------------------------------------------------


def main() -> None:
    """Run every measurement and write the results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", type=int, default=2000, help="real-size BMP cells for the end-to-end runs")
    parser.add_argument("--soak", type=int, default=10000, help="cells for the memory soak")
    parser.add_argument("--size", type=int, default=128, help="model input size")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6, help="training epochs of the bench model")
    parser.add_argument("--quick", action="store_true", help="small numbers, to check the script runs")
    args = parser.parse_args()
    if args.quick:
        args.cells, args.soak, args.epochs = 256, 512, 1
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    work = Path(tempfile.mkdtemp(prefix="allscore-bench-"))
    # The engine and worker steps measure TensorFlow float32 (bfloat16 where a step names it), as every run before
    # ALLSCORE_PRECISION and ALLSCORE_RUNTIME defaulted to auto: their figures stay comparable between machines and
    # runs. What auto serves on this machine is step 1b's `best_runtime`.
    set_env(ALLSCORE_HOME=str(work / "home"), ALLSCORE_PRECISION="float32", ALLSCORE_RUNTIME="tensorflow")
    from core.inference import configure_tensorflow

    configure_tensorflow(available_cores())
    results: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    log(f"work folder {work}; machine {results['machine']['cpu']}, {results['machine']['cores']} cores")

    from core.artifact import Registry, load_model
    from core.inference import ServingModel, cpu_has_bf16
    from core.storage import S3Store
    from trainer.synth import synthesize, write_sample

    log("training the bench model (seed architecture) on synthetic cells")
    store = train_bench_model(work, args.size, args.epochs)
    loaded = load_model("bench:v1", store=store)
    keras_model = loaded.model
    # The model as the worker runs it: batch norm folded, one traced graph (core.inference.ServingModel).
    model = ServingModel(keras_model, "float32")
    loaded.model = model
    gflop = model_gflop(keras_model)
    results["model"] = {
        "architecture": "seed",
        "input_size": args.size,
        "gflop_per_cell": round(gflop, 3),
        "parameters": int(keras_model.count_params()),
    }

    log(f"writing {args.cells} synthetic 450x450 BMP cells")
    cells_dir = work / "cells"
    paths = write_sample(cells_dir, args.cells, 0.3, seed=11)
    uris = [str(p) for p in paths]

    log("1. raw model, float32 and bfloat16")
    raw32, cpu32 = bench_raw(model, args.size, args.batch, 10)
    results["raw_fp32_cells_per_s"] = round(raw32, 1)
    cpu_ms: dict[str, float] = {"model_fp32": round(cpu32, 2)}
    results["cpu_ms_per_cell"] = cpu_ms
    results["gflops_achieved_fp32"] = round(raw32 * gflop, 1)
    if cpu_has_bf16():
        bf16_model = ServingModel(keras_model, "bfloat16")
        raw16, cpu16 = bench_raw(bf16_model, args.size, args.batch, 10)
        cpu_ms["model_bf16"] = round(cpu16, 2)
        results["raw_bf16_cells_per_s"] = round(raw16, 1)
        results["bf16_over_fp32"] = round(raw16 / raw32, 2)
        results["gflops_achieved_bf16"] = round(raw16 * gflop, 1)
        from trainer.evaluate import evaluate

        set_env(ALLSCORE_PRECISION="float32")
        held_out = work / "held-out"
        synthesize(held_out, subjects=6, cells=60, seed=99)  # subjects the model never saw
        wf32 = evaluate("bench:v1", held_out, store=store)["weighted_f1"]
        set_env(ALLSCORE_PRECISION="bfloat16")
        wf16 = evaluate("bench:v1", held_out, store=store)["weighted_f1"]
        set_env(ALLSCORE_PRECISION="float32")
        results["bf16_wf1_delta"] = round(wf16 - wf32, 4)
        results["wf1_fp32_held_out_synthetic"] = round(wf32, 4)
    else:
        results["bf16_over_fp32"] = None
        log("no AVX512_BF16/AMX on this CPU: bfloat16 not measured")

    log("1b. runtimes side by side (bench/runtimes.py), each in a process of its own")
    from bench.runtimes import DEFAULT_SIZE, measure_runtimes, train_models

    runtime_models = {args.size: (store, "bench:v1")}
    if args.size != DEFAULT_SIZE:
        runtime_models.update(train_models(work, (DEFAULT_SIZE,), args.epochs))
    results.update(measure_runtimes(work, runtime_models, batch=args.batch, seconds=3.0 if args.quick else 10.0))

    log("3. naive path: model.predict one image at a time")
    naive = bench_naive(keras_model, paths, args.size, min(120, len(paths)))
    results["naive_cells_per_s"] = round(naive, 1)

    log("2. engine end to end: local store / S3 server x SQLite / PostgreSQL")
    e2e: dict[str, Any] = {}
    from core.settings import get_settings
    from core.storage import Fetcher

    # The worker's own reader: one store (and S3 client) per bucket.
    fetch = Fetcher(get_settings())
    log("8. where the CPU goes: fetch + decode alone, CPU ms per cell")
    # Three passes over the cells, the median: a single pass just after writing them has read 0.46 and 1.1 where
    # focused runs read 0.25 and 0.77 (runs 9 and 7).
    passes = [round(bench_loads(uris, fetch, args.size), 3) for _ in range(3)]
    results["fetch_decode_passes_ms"] = passes
    cpu_ms["fetch_decode_local"] = statistics.median(passes)
    # Fetch and decode share the cores with the model: with nothing else per cell, end to end can reach at most
    # model / (model + fetch_decode) of the raw model's cells/s.
    for dtype in ("fp32", "bf16"):
        if f"model_{dtype}" in cpu_ms:
            model_ms = cpu_ms[f"model_{dtype}"]
            results[f"e2e_ceiling_{dtype}"] = round(model_ms / (model_ms + cpu_ms["fetch_decode_local"]), 3)
    e2e["local_sqlite"] = bench_engine(loaded, uris, fetch, f"sqlite:///{work / 'e2e.db'}", args.batch)
    with pg_database() as pg_url, moto_server_process() as endpoint:
        os.environ.update(
            {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
        )
        set_env(ALLSCORE_S3_ENDPOINT_URL=endpoint)
        s3 = S3Store()
        s3.ensure_bucket("s3://bench")

        def put(path: Path) -> str:
            uri = f"s3://bench/cells/{path.name}"
            s3.upload(path, uri)
            return uri

        with ThreadPoolExecutor(8) as pool:
            s3_uris = list(pool.map(put, paths))
        fetch = Fetcher(get_settings())  # now with the S3 endpoint
        e2e["local_postgres"] = bench_engine(loaded, uris, fetch, pg_url, args.batch)
        e2e["s3_sqlite"] = bench_engine(loaded, s3_uris, fetch, f"sqlite:///{work / 'e2e-s3.db'}", args.batch)
        e2e["s3_postgres"] = bench_engine(loaded, s3_uris, fetch, pg_url, args.batch)
        if cpu_has_bf16():
            from core.artifact import LoadedModel

            bf16_loaded = LoadedModel(
                model=ServingModel(keras_model, "bfloat16"), manifest=loaded.manifest, path=loaded.path
            )
            e2e["local_postgres_bf16"] = bench_engine(bf16_loaded, uris, fetch, pg_url, args.batch)
        results["engine"] = e2e
        best_e2e = max(v["cells_per_s"] for k, v in e2e.items() if not k.endswith("bf16"))
        results["e2e_cells_per_s"] = e2e["local_postgres"]["cells_per_s"]
        results["e2e_over_raw_best"] = round(best_e2e / raw32, 3)
        results["e2e_over_naive"] = round(e2e["local_postgres"]["cells_per_s"] / naive, 1)

        log("2b. end to end over raw, measured in pairs (raw, then engine) so that drift of the VM cancels")
        pairs = {"fp32": (model, loaded)}
        if cpu_has_bf16():
            pairs["bf16"] = (bf16_loaded.model, bf16_loaded)
            results["e2e_bf16_over_naive"] = round(e2e["local_postgres_bf16"]["cells_per_s"] / naive, 1)
        for dtype, (raw_model, engine_model) in pairs.items():
            ratios = paired_ratios(raw_model, engine_model, uris, fetch, pg_url, args)
            results[f"e2e_over_raw_pairs_{dtype}"] = ratios
            key = "e2e_over_raw" if dtype == "fp32" else "e2e_bf16_over_raw_bf16"
            results[key] = round(statistics.median(ratios), 3)

        log("5. database writes into PostgreSQL")
        results["pg_rows_per_s"] = round(bench_pg_rows(pg_url), 0)

        log("4. scaling through Redis with real worker processes")
        Registry(store).fetch("bench:v1")
        env = {
            "ALLSCORE_HOME": str(work / "home"),
            "ALLSCORE_DATABASE_URL": pg_url,
            "ALLSCORE_BROKER_URL": REDIS,
            "ALLSCORE_MODEL_STORE": store,
            "ALLSCORE_BATCH_SIZE": str(args.batch),
            "ALLSCORE_S3_ENDPOINT_URL": endpoint,
        }
        n = 8
        scaling = {
            "one_process_one_core": run_workers([("0", 1, 1)], env, uris, "bench:v1", work, n),
            "two_processes_two_cores": run_workers([("0", 1, 1), ("1", 1, 1)], env, uris, "bench:v1", work, n),
            "one_process_both_cores": run_workers([(None, 1, 2)], env, uris, "bench:v1", work, n),
            "prefork_two_children_one_thread_each": run_workers([(None, 2, 1)], env, uris, "bench:v1", work, n),
        }
        results["scaling"] = scaling
        results["scale_2_over_1"] = round(
            scaling["two_processes_two_cores"]["cells_per_s"] / scaling["one_process_one_core"]["cells_per_s"], 2
        )
        results["split_over_single"] = round(
            scaling["prefork_two_children_one_thread_each"]["cells_per_s"]
            / scaling["one_process_both_cores"]["cells_per_s"],
            2,
        )
        loads = [s["model_loads"] / s["processes"] for s in scaling.values()]
        results["loads_per_process"] = max(loads)
        results["model_load_seconds"] = sorted(t for s in scaling.values() for t in s["load_seconds"])
        results["peak_rss_mb_per_worker_process"] = max(
            r for s in scaling.values() for r in s["peak_rss_mb_per_process"]
        )

    log(f"6. memory soak: {args.soak} cells through the engine")
    results["soak"] = soak_memory(loaded, uris, fetch, args.batch, args.soak)

    log("9. microscope fields: segmentation per field, end to end from fields over from crops")
    from bench.fields import measure_fields

    results.update(measure_fields(loaded, work, batch=args.batch))

    write_results(results)
    shutil.rmtree(work, ignore_errors=True)


TARGETS = {
    "e2e_over_raw": (">=", 0.90),
    "e2e_over_naive": (">=", 6),
    "e2e_bf16_over_raw_bf16": (">=", 0.90),
    "e2e_bf16_over_naive": (">=", 6),
    "bf16_over_fp32": (">=", 1.7),
    "bf16_wf1_delta": ("abs<=", 0.01),
    "scale_2_over_1": (">=", 1.7),
    "split_over_single": (">=", 0.95),
    "pg_rows_per_s": (">=", 20000),
    "loads_per_process": ("==", 1),
    "best_over_tf_best": (">=", 1.5),
    "best_wf1_delta": ("abs<=", 0.01),
    "fields_e2e_over_crops_e2e": (">=", 0.8),
    "fields_vs_crops_fraction_delta": ("abs<=", 0.03),
}


def _meets(value: Any, op: str, target: float) -> str:
    if value is None:
        return "not measured"
    ok = {">=": value >= target, "==": value == target, "abs<=": abs(value) <= target}[op]
    return "yes" if ok else "**no**"


def write_results(results: dict[str, Any]) -> None:
    """latest.json and a markdown table beside it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2, default=str))
    m = results["machine"]
    lines = [
        f"# allscore benchmark, {m['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['flags'])}); TensorFlow {m['tensorflow']}, "
        f"Keras {m['keras']}. Model: {results['model']['architecture']} at {results['model']['input_size']}x"
        f"{results['model']['input_size']}, {results['model']['gflop_per_cell']} GFLOP per cell.",
        "",
        "| ratio | measured | target | met |",
        "|---|---|---|---|",
    ]
    for key, (op, target) in TARGETS.items():
        lines.append(
            f"| `{key}` | {results.get(key)} | {op.replace('abs<=', 'abs <=')} {target} | "
            f"{_meets(results.get(key), op, target)} |"
        )
    lines += [
        "",
        "| measurement | cells/s |",
        "|---|---|",
        f"| raw model, float32 | {results['raw_fp32_cells_per_s']} |",
        f"| raw model, bfloat16 | {results.get('raw_bf16_cells_per_s')} |",
        f"| naive `predict` per image | {results['naive_cells_per_s']} |",
    ]
    for name, run in results.get("engine", {}).items():
        lines.append(f"| engine end to end, {name.replace('_', ' + ')} ({run['cells']} cells) | {run['cells_per_s']} |")
    for name, run in results.get("scaling", {}).items():
        lines.append(f"| workers via Redis: {name.replace('_', ' ')} | {run['cells_per_s']} |")
    soak = results.get("soak", {})
    cpu_ms = results.get("cpu_ms_per_cell", {})
    lines += [
        "",
        f"End to end over raw, each ratio from a raw run just before its engine run (local store, PostgreSQL; the "
        f"ratio keys are the medians): float32 {results.get('e2e_over_raw_pairs_fp32')}, bfloat16 "
        f"{results.get('e2e_over_raw_pairs_bf16')}.",
        f"CPU ms per cell: model {cpu_ms.get('model_fp32')} (float32), {cpu_ms.get('model_bf16')} (bfloat16); "
        f"fetch + decode {cpu_ms.get('fetch_decode_local')} (local store; median of "
        f"{results.get('fetch_decode_passes_ms')}). Ceiling of end to end over raw when "
        f"both share the cores: {results.get('e2e_ceiling_fp32')} (float32), {results.get('e2e_ceiling_bf16')} "
        "(bfloat16).",
        f"GFLOP/s achieved: {results.get('gflops_achieved_fp32')} (float32), "
        f"{results.get('gflops_achieved_bf16')} (bfloat16). PostgreSQL cell rows/s: {results.get('pg_rows_per_s')}.",
        f"Model load seconds: {results.get('model_load_seconds')}; loads per process: "
        f"{results.get('loads_per_process')}; peak RSS per worker process: "
        f"{results.get('peak_rss_mb_per_worker_process')} MiB.",
        f"Memory soak: {soak.get('cells')} cells, RSS after each 1,000 (MiB): {soak.get('rss_mb')}; growth after "
        f"warm-up {soak.get('growth_mb_after_warmup')} MiB.",
        "",
        "| runtime (bench/runtimes.py) | size | cells/s | CPU ms/cell | GFLOP/s | RSS MiB | wF1 delta |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, by_runtime in results.get("runtimes", {}).items():
        for name, run in by_runtime.items():
            if isinstance(run, dict):
                lines.append(
                    f"| {name} | {size} | {run['cells_per_s']} | {run['cpu_ms_per_cell']} | {run['gflops']} | "
                    f"{run['rss_mib']} | {run['wf1_delta']} |"
                )
    lines += [
        f"ONNX Runtime over TensorFlow float32: {results.get('ort_over_tf_fp32')} (64x64), "
        f"{results.get('ort_over_tf_fp32_128')} (128x128); best at 128x128: {results.get('best_runtime_128')}, "
        f"{results.get('best_over_tf_best_128')} x TensorFlow's best.",
        "",
    ]
    (RESULTS / "latest.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
