"""Microscope fields in the bench: segmentation time per field, and end to end from fields against from crops.

- ``field_ms_p50``: milliseconds per field on one thread to decode, segment and cut out the cells (what a worker's
  I/O thread does per field), median over synthetic fields of 640x480 and of 2048x1536, as PNG and as JPEG.
- ``fields_e2e_over_crops_e2e``: cells/s through the engine (local files, SQLite) from a synthetic slide of 25
  fields of 12 white cells each (1024x768 JPEG, quality 92: what microscope cameras write; BCCD's fields are JPEG),
  over cells/s from the same cells given as their C-NMC crops, the median of PAIRS pairs run in turn; the model is
  the bench's (seed, float32).
  ``fields_e2e_over_crops_e2e_png``: the same from the lossless PNG fields (PNG decoding costs about 4x JPEG's).
- ``fields_vs_crops_fraction_delta``: that slide's ALL fraction from its fields minus from its cells' crops, the
  slide's scale given as a lab with a calibrated microscope gives it; ``..._estimated_scale``: the scale measured
  from the red cells instead.

Run alone: ``python -m bench.fields`` (trains a small bench model first) or from ``bench.run``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from core.storage import LocalStore

RESULTS = Path(__file__).with_name("results")

# Crops, JPEG fields and PNG fields run this many times in turn; the keys are the median pair's ratio. (Three pairs
# on a shared 2-vCPU VM spread 0.80-0.89 on one machine: five hold the median steadier.)
PAIRS = 5


def _fields(out: Path, *, n: int, width: int, height: int, seed: int, crops: bool = False) -> list[str]:
    from trainer.synth_fields import synthesize_fields

    synthesize_fields(out, fields=n, cells_per_field=12, width=width, height=height, seed=seed, crops=crops)
    return sorted(str(p) for p in (out / "fields").glob("*.png"))


def _as_jpeg(uris: list[str], quality: int = 92) -> list[str]:
    """The same fields written beside them as JPEG (4:4:4, the given quality): a camera's format."""
    from PIL import Image

    out = []
    for uri in uris:
        path = Path(uri).with_suffix(".jpg")
        with Image.open(uri) as image:
            image.save(path, "JPEG", quality=quality, subsampling=0)
        out.append(str(path))
    return out


def field_ms(uris: list[str], *, size: int, train_um: float) -> list[float]:
    """Wall ms per field on this thread: read, decode, segment, cut every whole lymphoid cell."""
    from worker.fields import read_field

    fetch = LocalStore().read_bytes
    times = []
    for uri in uris:
        start = time.perf_counter()
        read_field(uri, fetch, size=size, train_um_per_px=train_um, um_per_px=None, max_pixels=40_000_000)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def engine_cells_per_s(
    loaded: Any, uris: list[str], kind: str, db_url: str, batch: int, um_per_px: float | None = None
) -> dict[str, Any]:
    """One sample through the worker's engine (bench.measure.bench_engine, local files); cells/s of cells scored."""
    from bench.measure import bench_engine

    return bench_engine(loaded, uris, LocalStore().read_bytes, db_url, batch, kind=kind, um_per_px=um_per_px)


def synthetic_detection(
    out: Path, *, scales: tuple[float, ...] = (0.08, 0.105, 0.13, 0.155), per_slide: int = 5
) -> dict[str, Any]:
    """Recall, precision and centroid error on synthetic fields (touching cells, red cells over them), one slide of
    `per_slide` fields at each scale, the scale estimated for each slide as the worker does (the median over its
    fields; a slide is imaged at one magnification), never given.

    A found cell matches the nearest true white cell of its field within that cell's radius; a second match of the
    same true cell counts as an extra (a split).
    """

    import numpy as np

    from core.imaging import decode_field
    from core.segment import segment_field
    from trainer.synth_fields import synthesize_fields
    from worker.fields import sample_scale

    fetch = LocalStore().read_bytes
    n_truth = matched = found = 0
    errors: list[float] = []
    estimated = []
    for number, true_scale in enumerate(scales):
        slide = out / f"slide-{number}"
        synthesize_fields(
            slide, fields=per_slide, cells_per_field=12, um_per_px=(true_scale, true_scale), seed=31 + number
        )
        uris = sorted(str(p) for p in (slide / "fields").glob("*.png"))
        with (slide / "truth.csv").open() as fh:
            truth = list(csv.DictReader(fh))
        n_truth += len(truth)
        with ThreadPoolExecutor(2) as pool:
            scale = sample_scale(uris, fetch, pool, max_pixels=40_000_000)
        estimated.append(round((scale or 0.0) / true_scale - 1, 3))
        for uri in uris:
            name = f"fields/{Path(uri).name}"
            cells = [row for row in truth if row["field"] == name]
            seg = segment_field(decode_field(fetch(uri), source=uri), um_per_px=scale)
            hits: set[int] = set()
            for cell in seg.cells:
                found += 1
                d = [math.dist(cell.centroid, (float(r["x"]), float(r["y"]))) for r in cells]
                j = int(np.argmin(d))
                if d[j] <= float(cells[j]["radius_px"]) and j not in hits:
                    hits.add(j)
                    errors.append(d[j] * true_scale)
            matched += len(hits)
    return {
        "slides_scales": list(scales),
        "fields": len(scales) * per_slide,
        "white_cells": n_truth,
        "found": found,
        "recall": round(matched / n_truth, 4),
        "precision": round(matched / max(1, found), 4),
        "centroid_error_um_median_p95_max": [
            round(float(np.median(errors)), 2),
            round(float(np.percentile(errors, 95)), 2),
            round(max(errors), 2),
        ],
        "scale_estimate_error_per_slide": estimated,
    }


def measure_fields(loaded: Any, work: Path, *, batch: int = 64, n_fields: int = 25) -> dict[str, Any]:
    """The field keys of latest.json (module docstring)."""
    from core.segment import CNMC_UM_PER_PX

    size = loaded.manifest.input_size
    train_um = loaded.manifest.um_per_px or CNMC_UM_PER_PX
    results: dict[str, Any] = {"synthetic_detection": synthetic_detection(work / "detect")}
    small = _fields(work / "f640", n=12, width=640, height=480, seed=21)
    large = _fields(work / "f2048", n=6, width=2048, height=1536, seed=22)
    small_jpeg, large_jpeg = _as_jpeg(small), _as_jpeg(large)
    field_ms(small[:2], size=size, train_um=train_um)  # warm: imports, caches
    results["field_ms_p50"] = {
        name: round(statistics.median(field_ms(uris, size=size, train_um=train_um)), 1)
        for name, uris in (
            ("640x480", small),
            ("2048x1536", large),
            ("640x480_jpeg", small_jpeg),
            ("2048x1536_jpeg", large_jpeg),
        )
    }

    same = work / "same"
    uris = _fields(same, n=n_fields, width=1024, height=768, seed=23, crops=True)
    jpegs = _as_jpeg(uris)
    # The same cells as crops: those not cut by a field's edge (edge cells are counted, not scored, from fields).
    with (same / "truth.csv").open() as fh:
        truth = list(csv.DictReader(fh))
    crops = sorted(str(same / row["crop"]) for row in truth if row["edge"] == "0" and row["crop"])
    scale = float(truth[0]["um_per_px"])  # one slide, one magnification
    db = f"sqlite:///{work / 'fields-bench.db'}"
    engine_cells_per_s(loaded, crops[:64], "cells", db, batch)  # warm the traced graph
    pairs, pairs_png = [], []
    runs: dict[str, list[dict[str, Any]]] = {"fields_jpeg": [], "fields_png": [], "crops": []}
    for _ in range(PAIRS):
        from_crops = engine_cells_per_s(loaded, crops, "cells", db, batch)
        from_jpeg = engine_cells_per_s(loaded, jpegs, "fields", db, batch, um_per_px=scale)
        from_png = engine_cells_per_s(loaded, uris, "fields", db, batch, um_per_px=scale)
        runs["crops"].append(from_crops)
        runs["fields_jpeg"].append(from_jpeg)
        runs["fields_png"].append(from_png)
        pairs.append(round(from_jpeg["cells_per_s"] / from_crops["cells_per_s"], 3))
        pairs_png.append(round(from_png["cells_per_s"] / from_crops["cells_per_s"], 3))
    results["fields_engine_runs"] = runs
    results["fields_e2e_over_crops_e2e_pairs"] = pairs
    results["fields_e2e_over_crops_e2e"] = round(statistics.median(pairs), 3)
    results["fields_e2e_over_crops_e2e_png_pairs"] = pairs_png
    results["fields_e2e_over_crops_e2e_png"] = round(statistics.median(pairs_png), 3)
    # The answer itself: the same slide's ALL fraction from its fields and from its cells' own crops.
    estimated = engine_cells_per_s(loaded, uris, "fields", db, batch)
    fraction_fields, fraction_crops = runs["fields_png"][0]["all_fraction"], runs["crops"][0]["all_fraction"]
    results["fields_vs_crops_slide"] = {
        "um_per_px": scale,
        "true_all_fraction": round(sum(r["label"] == "all" for r in truth if r["edge"] == "0") / len(crops), 4),
        "cells_fields_crops": [runs["fields_png"][0]["cells"], runs["crops"][0]["cells"]],
    }
    results["fields_vs_crops_fraction"] = [fraction_fields, fraction_crops]
    if fraction_fields is not None and fraction_crops is not None:
        results["fields_vs_crops_fraction_delta"] = round(fraction_fields - fraction_crops, 4)
    if estimated["all_fraction"] is not None and fraction_crops is not None:
        results["fields_vs_crops_fraction_delta_estimated_scale"] = round(estimated["all_fraction"] - fraction_crops, 4)
    return results


def main() -> None:
    """Train a small bench model and measure the field keys alone (bench/results/fields.json)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--fields", type=int, default=25, help="fields of 12 white cells (25: a 300-cell slide)")
    parser.add_argument("--model-store", help="a store holding bench:v1 from an earlier run (skips training)")
    args = parser.parse_args()
    from bench.common import machine, set_env, train_bench_model
    from core.artifact import load_model
    from core.inference import ServingModel

    work = Path(tempfile.mkdtemp(prefix="allscore-fields-bench-"))
    set_env(ALLSCORE_HOME=str(work / "home"))
    store = args.model_store or train_bench_model(work, args.size, args.epochs)
    loaded = load_model("bench:v1", store=store)
    loaded.model = ServingModel(loaded.model, "float32")
    results = {"machine": machine(), "args": vars(args), **measure_fields(loaded, work, n_fields=args.fields)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fields.json").write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps({k: v for k, v in results.items() if not k.startswith("fields_engine")}, indent=2, default=str))


if __name__ == "__main__":
    main()
