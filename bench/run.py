"""`make bench`: allscore's throughput, measured in one run with one model on one machine.

Writes bench/results/latest.json and bench/results/latest.md. Never part of the test suite. Needs the local
PostgreSQL and Redis (as the tests do); starts its own S3 server (moto, as a subprocess).
Run: python -m bench.run [--cells 2000] [--soak 10000] [--quick]

The run is a list of steps (`STEPS`), each a small function of the shared `Bench` that adds its keys to the results;
the measurements themselves are in bench/measure.py, what they share in bench/common.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import REDIS, RESULTS, log, machine, model_gflop, pg_database, set_env, train_bench_model
from bench.measure import (
    bench_engine,
    bench_loads,
    bench_naive,
    bench_pg_rows,
    bench_raw,
    bench_stain_norm,
    paired_ratios,
    run_workers,
    soak_memory,
)
from tests.harness.services import moto_server_process
from worker.context import available_cores


@dataclass
class Bench:
    """What the steps share: the arguments, the work folder, the model (Keras, served, loaded), the cells, the
    reader, the services (a throwaway PostgreSQL database and an S3 server, started by the first step that needs
    them) and the results so far."""

    args: argparse.Namespace
    work: Path
    services: ExitStack
    results: dict[str, Any] = field(default_factory=dict)
    cpu_ms: dict[str, float] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    store: str = ""
    runtime_models: dict[int, tuple[str, str]] = field(default_factory=dict)  # {input size: (store, ref)}, step 1b
    keras_model: Any = None
    model: Any = None
    loaded: Any = None
    bf16_loaded: Any = None
    gflop: float = 0.0
    paths: list[Path] = field(default_factory=list)
    uris: list[str] = field(default_factory=list)
    fetch: Any = None
    raw32: float = 0.0
    naive: float = 0.0
    _pg_url: str | None = None
    _endpoint: str | None = None

    @property
    def pg_url(self) -> str:
        """A migrated throwaway database, made on first use and dropped when the run ends."""
        if self._pg_url is None:
            self._pg_url = self.services.enter_context(pg_database())
        return self._pg_url

    @property
    def s3_endpoint(self) -> str:
        """A moto S3 server in its own process, started on first use; settings and the reader point at it."""
        if self._endpoint is None:
            from core.settings import get_settings
            from core.storage import Fetcher

            self._endpoint = self.services.enter_context(moto_server_process())
            os.environ.update(
                {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
            )
            set_env(ALLSCORE_S3_ENDPOINT_URL=self._endpoint)
            self.fetch = Fetcher(get_settings())  # the worker's own reader, now with the S3 endpoint
        return self._endpoint


def step_model(b: Bench) -> None:
    from core.artifact import load_model
    from core.inference import ServingModel
    from trainer.synth import write_sample

    b.store = train_bench_model(b.work, b.args.size, b.args.epochs)
    b.loaded = load_model("bench:v1", store=b.store)
    b.keras_model = b.loaded.model
    # The model as the worker runs it: batch norm folded, one traced graph (core.inference.ServingModel).
    b.model = ServingModel(b.keras_model, "float32")
    b.loaded.model = b.model
    b.gflop = model_gflop(b.keras_model)
    b.results["model"] = {
        "architecture": "seed",
        "input_size": b.args.size,
        "gflop_per_cell": round(b.gflop, 3),
        "parameters": int(b.keras_model.count_params()),
    }
    log(f"writing {b.args.cells} synthetic 450x450 BMP cells")
    b.paths = write_sample(b.work / "cells", b.args.cells, 0.3, seed=11)
    b.uris = [str(p) for p in b.paths]
    b.results["cpu_ms_per_cell"] = b.cpu_ms


def step_raw(b: Bench) -> None:
    from core.inference import ServingModel, cpu_has_bf16
    from trainer.synth import synthesize

    raw32, cpu32 = bench_raw(b.model, b.args.size, b.args.batch, 10)
    b.raw32 = raw32
    b.results["raw_fp32_cells_per_s"] = round(raw32, 1)
    b.cpu_ms["model_fp32"] = round(cpu32, 2)
    b.results["gflops_achieved_fp32"] = round(raw32 * b.gflop, 1)
    if not cpu_has_bf16():
        b.results["bf16_over_fp32"] = None
        log("no AVX512_BF16/AMX on this CPU: bfloat16 not measured")
        return
    raw16, cpu16 = bench_raw(ServingModel(b.keras_model, "bfloat16"), b.args.size, b.args.batch, 10)
    b.cpu_ms["model_bf16"] = round(cpu16, 2)
    b.results["raw_bf16_cells_per_s"] = round(raw16, 1)
    b.results["bf16_over_fp32"] = round(raw16 / raw32, 2)
    b.results["gflops_achieved_bf16"] = round(raw16 * b.gflop, 1)
    from trainer.evaluate import evaluate

    set_env(ALLSCORE_PRECISION="float32")
    held_out = b.work / "held-out"
    synthesize(held_out, subjects=6, cells=60, seed=99)  # subjects the model never saw
    wf32 = evaluate("bench:v1", held_out, store=b.store)["weighted_f1"]
    set_env(ALLSCORE_PRECISION="bfloat16")
    wf16 = evaluate("bench:v1", held_out, store=b.store)["weighted_f1"]
    set_env(ALLSCORE_PRECISION="float32")
    b.results["bf16_wf1_delta"] = round(wf16 - wf32, 4)
    b.results["wf1_fp32_held_out_synthetic"] = round(wf32, 4)


def step_runtimes(b: Bench) -> None:
    from bench.runtimes import DEFAULT_SIZE, measure_runtimes, train_models

    models = {b.args.size: (b.store, "bench:v1")}
    if b.args.size != DEFAULT_SIZE:
        models.update(train_models(b.work, (DEFAULT_SIZE,), b.args.epochs))
    b.runtime_models = models  # step 1c serves the same versions (with the int8 exports made here)
    b.results.update(measure_runtimes(b.work, models, batch=b.args.batch, seconds=3.0 if b.args.quick else 10.0))


def step_served(b: Bench) -> None:
    from bench.served import measure_served

    cells = b.work / "cells"
    models = b.runtime_models or {b.args.size: (b.store, "bench:v1")}
    b.results.update(measure_served(b.work, models, cells, n=b.args.soak, batch=b.args.batch))


def step_naive(b: Bench) -> None:
    b.naive = bench_naive(b.keras_model, b.paths, b.args.size, min(120, len(b.paths)))
    b.results["naive_cells_per_s"] = round(b.naive, 1)


def step_loads(b: Bench) -> None:
    from core.settings import get_settings
    from core.storage import Fetcher

    b.fetch = Fetcher(get_settings())  # the worker's own reader: one store (and S3 client) per bucket
    # Three passes over the cells, the median: a single pass just after writing them has read 0.46 and 1.1 where
    # focused runs read 0.25 and 0.77 (runs 9 and 7).
    passes = [round(bench_loads(b.uris, b.fetch, b.args.size), 3) for _ in range(3)]
    b.results["fetch_decode_passes_ms"] = passes
    b.cpu_ms["fetch_decode_local"] = statistics.median(passes)
    # Fetch and decode share the cores with the model: with nothing else per cell, end to end can reach at most
    # model / (model + fetch_decode) of the raw model's cells/s.
    for dtype in ("fp32", "bf16"):
        if f"model_{dtype}" in b.cpu_ms:
            model_ms = b.cpu_ms[f"model_{dtype}"]
            b.results[f"e2e_ceiling_{dtype}"] = round(model_ms / (model_ms + b.cpu_ms["fetch_decode_local"]), 3)
    # A version trained with --stain-norm sample costs this much more per cell in the engine (and one fit per sample).
    norm_ms, fit_ms = bench_stain_norm(b.uris, b.fetch, b.args.size, b.args.batch)
    b.cpu_ms["stain_norm"] = round(norm_ms, 3)
    b.results["stain_norm_fit_ms_per_sample"] = round(fit_ms, 1)
    model_ms = b.cpu_ms["model_fp32"]
    b.results["e2e_ceiling_fp32_stain_norm"] = round(
        model_ms / (model_ms + b.cpu_ms["fetch_decode_local"] + norm_ms), 3
    )


def step_engine(b: Bench) -> None:
    from core.artifact import LoadedModel
    from core.inference import ServingModel, cpu_has_bf16
    from core.storage import S3Store

    e2e, args = b.engine, b.args
    e2e["local_sqlite"] = bench_engine(b.loaded, b.uris, b.fetch, f"sqlite:///{b.work / 'e2e.db'}", args.batch)
    pg_url, _ = b.pg_url, b.s3_endpoint
    s3 = S3Store()
    s3.ensure_bucket("s3://bench")

    def put(path: Path) -> str:
        uri = f"s3://bench/cells/{path.name}"
        s3.upload(path, uri)
        return uri

    with ThreadPoolExecutor(8) as pool:
        s3_uris = list(pool.map(put, b.paths))
    e2e["local_postgres"] = bench_engine(b.loaded, b.uris, b.fetch, pg_url, args.batch)
    e2e["s3_sqlite"] = bench_engine(b.loaded, s3_uris, b.fetch, f"sqlite:///{b.work / 'e2e-s3.db'}", args.batch)
    e2e["s3_postgres"] = bench_engine(b.loaded, s3_uris, b.fetch, pg_url, args.batch)
    if cpu_has_bf16():
        bf16 = ServingModel(b.keras_model, "bfloat16")
        b.bf16_loaded = LoadedModel(model=bf16, manifest=b.loaded.manifest, path=b.loaded.path)
        e2e["local_postgres_bf16"] = bench_engine(b.bf16_loaded, b.uris, b.fetch, pg_url, args.batch)
    b.results["engine"] = e2e
    best_e2e = max(v["cells_per_s"] for k, v in e2e.items() if not k.endswith("bf16"))
    b.results["e2e_cells_per_s"] = e2e["local_postgres"]["cells_per_s"]
    b.results["e2e_over_raw_best"] = round(best_e2e / b.raw32, 3)
    b.results["e2e_over_naive"] = round(e2e["local_postgres"]["cells_per_s"] / b.naive, 1)


def step_pairs(b: Bench) -> None:
    pairs = {"fp32": (b.model, b.loaded)}
    if b.bf16_loaded is not None:
        pairs["bf16"] = (b.bf16_loaded.model, b.bf16_loaded)
        b.results["e2e_bf16_over_naive"] = round(b.engine["local_postgres_bf16"]["cells_per_s"] / b.naive, 1)
    for dtype, (raw_model, engine_model) in pairs.items():
        ratios = paired_ratios(raw_model, engine_model, b.uris, b.fetch, b.pg_url, b.args)
        b.results[f"e2e_over_raw_pairs_{dtype}"] = ratios
        key = "e2e_over_raw" if dtype == "fp32" else "e2e_bf16_over_raw_bf16"
        b.results[key] = round(statistics.median(ratios), 3)


def step_pg_rows(b: Bench) -> None:
    b.results["pg_rows_per_s"] = round(bench_pg_rows(b.pg_url), 0)


def step_scaling(b: Bench) -> None:
    from core.artifact import Registry

    Registry(b.store).fetch("bench:v1")
    env = {
        "ALLSCORE_HOME": str(b.work / "home"),
        "ALLSCORE_DATABASE_URL": b.pg_url,
        "ALLSCORE_BROKER_URL": REDIS,
        "ALLSCORE_MODEL_STORE": b.store,
        "ALLSCORE_BATCH_SIZE": str(b.args.batch),
        "ALLSCORE_S3_ENDPOINT_URL": b.s3_endpoint,
    }
    uris, work, n = b.uris, b.work, 8
    scaling = {
        "one_process_one_core": run_workers([("0", 1, 1)], env, uris, "bench:v1", work, n),
        "two_processes_two_cores": run_workers([("0", 1, 1), ("1", 1, 1)], env, uris, "bench:v1", work, n),
        "one_process_both_cores": run_workers([(None, 1, 2)], env, uris, "bench:v1", work, n),
        "prefork_two_children_one_thread_each": run_workers([(None, 2, 1)], env, uris, "bench:v1", work, n),
    }
    r = b.results
    r["scaling"] = scaling
    r["scale_2_over_1"] = round(
        scaling["two_processes_two_cores"]["cells_per_s"] / scaling["one_process_one_core"]["cells_per_s"], 2
    )
    r["split_over_single"] = round(
        scaling["prefork_two_children_one_thread_each"]["cells_per_s"]
        / scaling["one_process_both_cores"]["cells_per_s"],
        2,
    )
    r["loads_per_process"] = max(s["model_loads"] / s["processes"] for s in scaling.values())
    r["model_load_seconds"] = sorted(t for s in scaling.values() for t in s["load_seconds"])
    r["peak_rss_mb_per_worker_process"] = max(x for s in scaling.values() for x in s["peak_rss_mb_per_process"])


def step_soak(b: Bench) -> None:
    b.results["soak"] = soak_memory(b.loaded, b.uris, b.fetch, b.args.batch, b.args.soak)


def step_fields(b: Bench) -> None:
    from bench.fields import measure_fields

    b.results.update(measure_fields(b.loaded, b.work, batch=b.args.batch))


# The run, in order (later steps use what earlier ones left in the Bench). The numbers are the steps' names in
# bench/README.md's history of runs.
STEPS: list[tuple[str, Callable[[Bench], None]]] = [
    ("0. the bench model (seed architecture) trained on synthetic cells, and the cells", step_model),
    ("1. raw model, float32 and bfloat16", step_raw),
    ("1b. runtimes side by side (bench/runtimes.py), each in a process of its own", step_runtimes),
    ("1c. the served default (auto) in a worker process of its own: end to end over raw, RSS", step_served),
    ("3. naive path: model.predict one image at a time", step_naive),
    ("8. where the CPU goes: fetch + decode alone, CPU ms per cell", step_loads),
    ("2. engine end to end: local store / S3 server x SQLite / PostgreSQL", step_engine),
    ("2b. end to end over raw, measured in pairs (raw, then engine) so that drift of the VM cancels", step_pairs),
    ("5. database writes into PostgreSQL", step_pg_rows),
    ("4. scaling through Redis with real worker processes", step_scaling),
    ("6. memory soak through the engine", step_soak),
    ("9. microscope fields: segmentation per field, end to end from fields over from crops", step_fields),
]


def main() -> None:
    """Run every step and write the results."""
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
    with ExitStack() as services:
        bench = Bench(args=args, work=work, services=services, results={"machine": machine(), "args": vars(args)})
        m = bench.results["machine"]
        log(f"work folder {work}; machine {m['cpu']}, {m['cores']} cores")
        for title, step in STEPS:
            log(title)
            step(bench)
    write_results(bench.results)
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
    "e2e_over_raw_served": (">=", 0.90),
    "worker_rss_mib": ("<=", 350),
    "fields_e2e_over_crops_e2e": (">=", 0.8),
    "fields_vs_crops_fraction_delta": ("abs<=", 0.03),
}


def _meets(value: Any, op: str, target: float) -> str:
    if value is None:
        return "not measured"
    ok = {">=": value >= target, "<=": value <= target, "==": value == target, "abs<=": abs(value) <= target}[op]
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
        "| served default (auto) in a worker process (bench/served.py) | size | raw cells/s | end to end over raw | "
        "ceiling | RSS MiB after the cells |",
        "|---|---|---|---|---|---|",
    ]
    for size, run in results.get("served", {}).items():
        lines.append(
            f"| {run['runtime']} {run['precision']} | {size} | {run['raw_cells_per_s']} | {run['e2e_over_raw']} | "
            f"{run.get('e2e_ceiling')} | {run['rss_mib']} ({run['cells']} cells) |"
        )
    lines.append("")
    (RESULTS / "latest.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
