"""The served default in a worker process: what ALLSCORE_RUNTIME=auto and ALLSCORE_PRECISION=auto serve for a
version on this machine (core.runtimes.choose_serving, through the worker's own WorkerContext), that process's
end-to-end cells/s over the same model's raw cells/s, and its RSS after scoring N single-cell images.

Each version runs in a process of its own (`python -m bench.served --child ...`), so that the RSS is that worker's
alone and a process on ONNX Runtime never imports TensorFlow. Called by bench/run.py (step 1c).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import REPO, log, rss_mb
from bench.measure import bench_raw
from bench.runtimes import DEFAULT_SIZE


def _child(store: str, ref: str, cells: Path, n: int, batch: int, out: Path) -> None:
    """One worker process's view: load the version as the worker does, raw cells/s, then N cells end to end."""
    os.environ.update(ALLSCORE_MODEL_STORE=store, ALLSCORE_PRECISION="auto", ALLSCORE_RUNTIME="auto")
    from core.runtimes import tensorflow_imported
    from core.settings import get_settings
    from worker.context import WorkerContext, io_threads_for
    from worker.engine import score_cells, stain_target

    settings = get_settings()
    ctx = WorkerContext(settings)
    loaded = ctx.model(ref)
    size = loaded.manifest.input_size
    raw, raw_cpu_ms = bench_raw(loaded.model, size, batch, 5)
    uris = sorted(str(p) for p in cells.iterdir())
    done = 0
    with ThreadPoolExecutor(io_threads_for(settings)) as pool:

        def run(chunk: list[str]) -> None:
            score_cells(
                chunk,
                model=loaded.model,
                size=size,
                threshold=loaded.manifest.threshold,
                fetch=ctx.fetch,
                pool=pool,
                batch_size=batch,
                stain=stain_target(loaded.manifest),
            )

        run(uris[:batch])  # warm: the first batch traces the graph or builds the session's arena
        start = time.perf_counter()
        while done < n:
            chunk = uris[: min(len(uris), n - done)]
            run(chunk)
            done += len(chunk)
        e2e = done / (time.perf_counter() - start)
    rss, peak = rss_mb()
    # The ceiling of end to end over raw when reading and decoding share the cores with the model: model CPU over
    # model + fetch + decode CPU (one thread reads and decodes 1,000 of the cells to the model's size).
    from worker.fields import read_cell

    cpu0 = time.process_time()
    read = [read_cell(uri, ctx.fetch, size=size, max_pixels=settings.max_image_pixels) for uri in (uris * 4)[:1000]]
    decode_ms = (time.process_time() - cpu0) / len(read) * 1e3
    result = {
        "runtime": loaded.model.runtime,
        "precision": loaded.model.precision,
        "input_size": size,
        "raw_cells_per_s": round(raw, 1),
        "raw_cpu_ms_per_cell": round(raw_cpu_ms, 3),
        "e2e_cells_per_s": round(e2e, 1),
        "e2e_over_raw": round(e2e / raw, 3),
        "fetch_decode_cpu_ms_per_cell": round(decode_ms, 3),
        "e2e_ceiling": round(raw_cpu_ms / (raw_cpu_ms + decode_ms), 3),
        "cells": done,
        "rss_mib": round(rss, 1),
        "peak_rss_mib": round(peak, 1),
        "tensorflow_imported": tensorflow_imported(),
    }
    out.write_text(json.dumps(result))


def measure_served(
    work: Path, models: dict[int, tuple[str, str]], cells: Path, *, n: int, batch: int
) -> dict[str, Any]:
    """The served default for each model {input size: (store, ref)}: keys `served` (per size), for the largest size
    `served_default`, `e2e_over_raw_served` and `worker_rss_mib`, and for the default input size, where it was
    measured, `e2e_over_raw_default`, its ceiling `e2e_ceiling_default` and `worker_rss_mib_default`."""
    served: dict[str, Any] = {}
    for size, (store, ref) in sorted(models.items()):
        out = work / f"served-{size}.json"
        log(f"{ref} ({size}x{size}): the served default over {n} cells, in a process of its own")
        cmd = [sys.executable, "-m", "bench.served", "--child", store, ref, str(cells), str(n), str(batch), str(out)]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"bench.served failed for {ref}:\n{done.stderr[-3000:]}")
        served[str(size)] = json.loads(out.read_text())
    largest = served[str(max(models))]
    results = {
        "served": served,
        "served_default": f"{largest['runtime']} {largest['precision']}",
        "e2e_over_raw_served": largest["e2e_over_raw"],
        "worker_rss_mib": largest["rss_mib"],
    }
    default = served.get(str(DEFAULT_SIZE))
    if default is not None:
        results["e2e_over_raw_default"] = default["e2e_over_raw"]
        results["e2e_ceiling_default"] = default["e2e_ceiling"]
        results["worker_rss_mib_default"] = default["rss_mib"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", nargs=6, metavar=("STORE", "REF", "CELLS", "N", "BATCH", "OUT"), required=True)
    args = parser.parse_args()
    store, ref, cells, n, batch, out = args.child
    _child(store, ref, Path(cells), int(n), int(batch), Path(out))


if __name__ == "__main__":
    main()
