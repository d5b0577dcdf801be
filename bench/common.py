"""What every bench measurement shares: progress lines, the machine's description, the model's GFLOP, a process's
memory and CPU time, the settings, a throwaway PostgreSQL database (tests.harness.services), and the bench model."""

from __future__ import annotations

import os
import platform
import re
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def cpu_seconds() -> float:
    """CPU time (user + system) of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def set_env(**values: str) -> None:
    """Point settings at new values (environment + cache reset)."""
    from core.settings import reset_settings_cache

    os.environ.update(values)
    reset_settings_cache()


@contextmanager
def pg_database() -> Iterator[str]:
    """A throwaway PostgreSQL database (tests.harness.services), migrated."""
    from db.migrate import upgrade
    from tests.harness.services import pg_admin_url_from_env, throwaway_database

    with throwaway_database(pg_admin_url_from_env()) as url:
        upgrade(url)
        yield url


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
