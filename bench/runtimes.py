"""Runtimes side by side (issue 16): raw cells/s, CPU ms and GFLOP/s per cell, weighted F1 against TensorFlow
float32 on held-out synthetic subjects, and the RSS of a process that does nothing else, for each runtime x
precision this machine has (int8: the version's gated export), at the default model (seed at 64x64) and at 128x128.

Each measurement runs in a process of its own (`python -m bench.runtimes --child ...`), so that its RSS is that
runtime's alone and the ONNX Runtime and OpenVINO processes never import TensorFlow. OpenVINO (allscore[openvino])
reads the same ONNX files as ONNX Runtime. Called by bench/run.py
(`measure_runtimes`); run alone: `python -m bench.runtimes [--quick]` (trains its own two models).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SIZE = 64  # the seed architecture's default input size
RUNTIME_KEYS = {"tensorflow": "tf", "onnxruntime": "ort", "openvino": "ov"}  # the keys' prefixes


def _log(msg: str) -> None:
    print(f"[bench.runtimes {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _rss_mib() -> tuple[float, float]:
    status = Path("/proc/self/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    return rss, hwm


def _child(runtime: str, precision: str, path: Path, held_out: Path, batch: int, seconds: float, out: Path) -> None:
    """One runtime in this process: load, probabilities on the held-out cells, then raw cells/s for `seconds`."""
    import resource

    from core.cpus import available_cores
    from core.inference import predict_batch, predict_proba
    from core.runtimes import load_runtime_model

    threads = available_cores().count
    if runtime == "tensorflow":
        from core.inference import configure_tensorflow

        configure_tensorflow(threads)
    model = load_runtime_model(runtime, path, precision, threads)
    images = np.load(held_out)["images"]
    p = predict_proba(model, images, batch_size=batch)
    size = images.shape[1]
    x = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    for _ in range(3):
        predict_batch(model, x)

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    done, start, cpu0 = 0, time.perf_counter(), cpu()
    while time.perf_counter() - start < seconds:
        done += len(predict_batch(model, x))
    elapsed = time.perf_counter() - start
    rss, peak = _rss_mib()
    np.save(out.with_suffix(".npy"), p)
    out.write_text(
        json.dumps(
            {
                "runtime": model.runtime,
                "precision": model.precision,
                "threads": threads,
                "cells_per_s": round(done / elapsed, 1),
                "cpu_ms_per_cell": round((cpu() - cpu0) / done * 1e3, 3),
                "rss_mib": round(rss, 1),
                "peak_rss_mib": round(peak, 1),
                "tensorflow_imported": "tensorflow" in sys.modules,
            }
        )
    )


def _run_child(
    runtime: str, precision: str, path: Path, held_out: Path, batch: int, seconds: float, work: Path
) -> tuple[dict[str, Any], np.ndarray]:
    out = work / f"runtime-{runtime}-{precision}-{path.parent.parent.name}.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "bench.runtimes", "--child", runtime, precision, str(path), str(held_out)]
    args += ["--batch", str(batch), "--seconds", str(seconds), "--out", str(out)]
    subprocess.run(args, cwd=REPO, env=env, check=True, timeout=900)
    return json.loads(out.read_text()), np.load(out.with_suffix(".npy"))


def measure_runtimes(
    work: Path,
    models: dict[int, tuple[str, str]],
    *,
    batch: int = 64,
    seconds: float = 10.0,
    held_out_subjects: int = 6,
) -> dict[str, Any]:
    """Every runtime x precision on each model {input size: (store, ref)}; the ratios of issue 16.

    Keys: `runtimes` (per model size and runtime: cells/s, CPU ms/cell, GFLOP/s, RSS, wF1 delta), and at the
    default size `ort_over_tf_fp32`, `best_over_tf_best`, `best_over_tf_fp32`, `best_wf1_delta`, `best_runtime`;
    at 128x128 the same with the suffix `_128`.
    """
    from bench.common import model_gflop
    from core.artifact import Registry, load_keras
    from core.inference import cpu_has_bf16
    from core.runtimes import onnxruntime_available, openvino_available
    from trainer.discovery import discover
    from trainer.loading import decode_cells
    from trainer.metrics import weighted_f1
    from trainer.synth import synthesize

    held_out_dir = work / "runtimes-held-out"
    if not held_out_dir.exists():
        synthesize(held_out_dir, subjects=held_out_subjects, cells=60, seed=99)  # subjects no model saw
    cells = discover(held_out_dir).cells
    results: dict[str, Any] = {"runtimes": {}}
    for size, (store, ref) in sorted(models.items()):
        registry = Registry(store)
        keras_path, manifest = registry.fetch(ref)
        gflop = model_gflop(load_keras(keras_path))
        arrays = decode_cells(cells, size)
        held_out = work / f"held-out-{size}.npz"
        np.savez(held_out, images=arrays.images)
        runs: list[tuple[str, str, Path]] = [("tensorflow", "float32", keras_path)]
        if cpu_has_bf16():
            runs.append(("tensorflow", "bfloat16", keras_path))
        if onnxruntime_available() and "onnx" in manifest.exports:
            onnx_path = registry.fetch_export(ref)[0]
            runs.append(("onnxruntime", "float32", onnx_path))
            int8_path = _with_int8(store, ref, work, results)
            if int8_path is not None:
                runs.append(("onnxruntime", "int8", int8_path))
            if openvino_available():  # the same ONNX files, read by OpenVINO
                runs.append(("openvino", "float32", onnx_path))
                if cpu_has_bf16():
                    runs.append(("openvino", "bfloat16", onnx_path))
                if int8_path is not None:
                    runs.append(("openvino", "int8", int8_path))
        measured: dict[str, dict[str, Any]] = {}
        reference_wf1 = None
        for runtime, precision, path in runs:
            _log(f"{ref} ({size}x{size}): {runtime} {precision}")
            figures, p = _run_child(runtime, precision, path, held_out, batch, seconds, work)
            wf1 = weighted_f1(arrays.labels, (p >= manifest.threshold).astype(int))
            reference_wf1 = wf1 if reference_wf1 is None else reference_wf1  # TensorFlow float32 runs first
            figures.update(
                {
                    "gflops": round(figures["cells_per_s"] * gflop, 1),
                    "weighted_f1": round(wf1, 4),
                    "wf1_delta": round(wf1 - reference_wf1, 4),
                }
            )
            short = {"float32": "fp32", "bfloat16": "bf16", "int8": "int8"}[precision]
            measured[f"{RUNTIME_KEYS[runtime]}_{short}"] = figures
        results["runtimes"][str(size)] = {"gflop_per_cell": round(gflop, 4), "model": ref, **measured}
        suffix = "" if size == DEFAULT_SIZE else f"_{size}"
        tf_fp32 = measured["tf_fp32"]["cells_per_s"]
        tf_best = max(measured[k]["cells_per_s"] for k in measured if k.startswith("tf_"))
        if "ort_fp32" in measured:
            results[f"ort_over_tf_fp32{suffix}"] = round(measured["ort_fp32"]["cells_per_s"] / tf_fp32, 2)
        for key in ("ort_int8", "ov_int8"):
            if key in measured:
                measured[key]["refused_by_gate"] = ref in results.get("int8_refused", {})
        accurate = {k: v for k, v in measured.items() if abs(v["wf1_delta"]) <= 0.01 and not v.get("refused_by_gate")}
        best = max(accurate, key=lambda k: accurate[k]["cells_per_s"])
        results[f"best_runtime{suffix}"] = best
        results[f"best_over_tf_best{suffix}"] = round(accurate[best]["cells_per_s"] / tf_best, 2)
        results[f"best_over_tf_fp32{suffix}"] = round(accurate[best]["cells_per_s"] / tf_fp32, 2)
        results[f"best_wf1_delta{suffix}"] = accurate[best]["wf1_delta"]
    return results


def _with_int8(store: str, ref: str, work: Path, results: dict[str, Any]) -> Path | None:
    """The version's int8 export, made first if it has none (calibrated and gated on its own validation subjects).
    When the gate refuses it, the same quantization is still measured (from work/, never published): the refusal
    is recorded in results["int8_refused"] and that run is never the best."""
    from core.artifact import Registry
    from trainer.export import ExportMismatch, agreement, export_int8_published, int8_cells, quantize_int8

    registry = Registry(store)
    try:
        export_int8_published(ref, store=store)
        return registry.fetch_export(ref, "onnx-int8")[0]
    except ExportMismatch as exc:
        _log(f"{ref}: int8 refused: {exc}")
        results.setdefault("int8_refused", {})[ref] = str(exc)
        manifest = registry.resolve(ref)
        try:
            calibration = int8_cells(manifest)[0]
        except ExportMismatch:
            return None
        out = work / f"refused-int8-{manifest.name}.onnx"
        float_path = registry.fetch_export(ref)[0]
        quantize_int8(float_path, out, calibration, agrees=agreement(float_path, calibration))
        return out


def train_models(work: Path, sizes: tuple[int, ...], epochs: int) -> dict[int, tuple[str, str]]:
    """A `seed` model per input size, trained briefly on synthetic cells and published with its ONNX export."""
    from rich.console import Console

    from trainer.synth import synthesize
    from trainer.train import TrainConfig, publish, train_model

    data = work / "train-data"
    if not data.exists():
        synthesize(data, subjects=12, cells=120, seed=7)
    store = str(work / "models")
    out = {}
    for size in sizes:
        config = TrainConfig(
            name=f"bench{size}", arch="seed", image_size=size, epochs=epochs, patience=epochs, version="v1"
        )
        manifest = publish(train_model(data, config, Console(stderr=True)), store)
        out[size] = (store, manifest.ref)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", nargs=4, metavar=("RUNTIME", "PRECISION", "MODEL", "HELD_OUT"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="1 epoch, 3-second runs")
    args = parser.parse_args()
    if args.child:
        runtime, precision, model, held_out = args.child
        _child(runtime, precision, Path(model), Path(held_out), args.batch, args.seconds, args.out)
        return
    if args.quick:
        args.epochs, args.seconds = 1, 3.0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory(prefix="allscore-bench-runtimes-") as tmp:
        work = Path(tmp)
        os.environ["ALLSCORE_HOME"] = str(work / "home")
        from core.inference import configure_tensorflow

        configure_tensorflow(0)
        models = train_models(work, (DEFAULT_SIZE, 128), args.epochs)
        results = measure_runtimes(work, models, batch=args.batch, seconds=args.seconds)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
