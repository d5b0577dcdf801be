"""One settings object, read from the environment (prefix ALLSCORE_) and an optional .env file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.contract import DEFAULT_STORE, STORE_NAME_RE


class Settings(BaseSettings):
    """allscore configuration; every field is ALLSCORE_<NAME> in the environment."""

    model_config = SettingsConfigDict(env_prefix="ALLSCORE_", env_file=".env", extra="ignore")

    # Embedded defaults: everything under one folder, no server needed.
    home: Path = Field(default=Path("~/.allscore"), description="folder for the embedded defaults")
    database_url: str = Field(default="", description="SQLAlchemy URL; default sqlite file under home")
    broker_url: str = Field(default="", description="Celery broker; default redis://127.0.0.1:6379/0")
    model_store: str = Field(default="", description="model registry root: a folder or s3://bucket/prefix")
    # Further stores a submission may name (`submit --store NAME`), as JSON: {"archive": "s3://old-models"}.
    # A task message names a store, never a path; the worker resolves the name here.
    model_stores: dict[str, str] = Field(default_factory=dict, description="extra model stores by name")
    cache_dir: Path = Field(default=Path(""), description="local cache of downloaded models")

    # S3 (any S3-compatible endpoint). Credentials come from the standard AWS_* variables.
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_max_attempts: int = 5
    s3_connect_timeout: float = 5.0
    s3_read_timeout: float = 60.0

    # Scoring.
    model: str = Field(default="allscore@production", description="model reference `submit` uses by default")
    queue: str = "allscore"
    batch_size: int = Field(default=64, ge=1, le=4096)
    # int8: the version's static int8 quantization (model-int8.onnx), served by ONNX Runtime or OpenVINO. auto: the
    # fastest measured that holds accuracy for this CPU and version (core.runtimes.choose_serving).
    precision: Literal["auto", "float32", "bfloat16", "int8"] = Field(
        default="auto", description="auto | float32 | bfloat16 | int8"
    )
    # Which runtime runs the model's forward pass (core/runtimes.py): TensorFlow on model.keras, or ONNX Runtime or
    # OpenVINO on the version's ONNX export (a worker on either never imports TensorFlow, and refuses a version
    # without the export); auto: chosen with the precision (core.runtimes.choose_serving).
    runtime: Literal["tensorflow", "onnxruntime", "openvino", "auto"] = Field(
        default="auto", description="tensorflow | onnxruntime | openvino | auto"
    )
    # Test-time augmentation (core/tta.py): 8 averages each cell's p(all) over its flips and rotations, at 8 times
    # the model's cost; 1 scores each cell once.
    tta: int = Field(default=1, description="1 | 8 views per cell")
    tf_threads: int = Field(default=0, ge=0, description="TensorFlow threads per process; 0 = cores/concurrency")
    worker_concurrency: int = Field(default=0, ge=0, description="worker processes; 0 = number of cores")
    # Fetch+decode threads per worker process. They share the cores with TensorFlow: on 2 cores, 2 threads
    # scored 0.90 of the raw bf16 model end to end against 0.83 with 8 (AMD EPYC). Raise it for a high-latency store.
    io_threads: int = Field(default=0, ge=0, description="fetch/decode threads per process; 0 = cores (min 2)")
    flag_thresholds: list[float] = Field(default_factory=lambda: [0.05, 0.20, 0.25])
    # Below this many scored cells a sample is flagged `low_count`: a blast percentage over fewer cells is not
    # read clinically (the Wilson interval shows why). 0 turns the flag off.
    low_count: int = Field(default=200, ge=0)
    # A field sample whose fields hold more cells than this fails with the reason (split the slide).
    max_cells_per_sample: int = Field(default=200_000, ge=1)
    allowed_roots: list[str] = Field(default_factory=list, description="local folders and s3:// prefixes")
    task_soft_time_limit: int = 1800
    # On SIGTERM a worker lets running samples finish for this long, then hands the rest back to the queue
    # and exits (below Docker's default 10 s stop grace period, after which the process is killed).
    worker_shutdown_grace: float = Field(default=8.0, ge=0, description="seconds running samples get on SIGTERM")
    task_time_limit: int = 2100
    task_max_retries: int = 5
    # A sample whose processing has killed its worker process this many times is failed, not redelivered forever.
    max_worker_deaths: int = Field(default=3, ge=1)
    # Retry n waits a random time in [0, min(cap, base * 2**n)] seconds (full jitter).
    task_retry_backoff: float = Field(default=2.0, gt=0, description="seconds: backoff base of a retry")
    task_retry_backoff_max: float = Field(default=120.0, gt=0, description="seconds: cap of one retry's backoff")

    # Image decoding guard: refuse images whose declared size exceeds this many pixels.
    max_image_pixels: int = 40_000_000
    # Reads are capped before decoding: a bigger file or object is refused, never read into memory.
    max_image_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    # Submissions over this many images per sample are refused at submit (split the slide into samples).
    max_images_per_sample: int = Field(default=20_000, ge=1)

    # Operations: logs, metrics, health.
    log_format: Literal["text", "json"] = Field(default="text", description="json: one JSON object per line")
    # `allscore worker` serves Prometheus metrics (/metrics) and its health (/healthz) here; 0 = off.
    metrics_port: int = Field(default=0, ge=0, le=65535, description="worker metrics and health port; 0 = off")
    # /healthz fails once the consumer's last beat (every 5 s from inside Celery's event loop) is older than this.
    health_max_age: float = Field(default=30.0, gt=0, description="seconds without a consumer beat before unhealthy")

    # Completion callbacks (submit --notify URL): the only hosts a worker POSTs to (host or host:port; empty: none),
    # the shared secret that signs each POST, and how hard it tries.
    notify_hosts: list[str] = Field(default_factory=list, description="hosts callbacks may go to")
    notify_secret: str = Field(default="", description="HMAC-SHA256 key that signs each callback")
    notify_attempts: int = Field(default=5, ge=1, le=20, description="tries per callback")
    notify_timeout: float = Field(default=10.0, gt=0, description="seconds per try")
    notify_backoff: float = Field(default=1.0, ge=0, description="seconds before the 2nd try; doubles each time")

    # PostgreSQL: a hung database is a transient fault, not a hung task.
    db_connect_timeout: int = Field(default=10, ge=1, description="seconds to wait for a connection")
    db_statement_timeout_ms: int = Field(default=120_000, ge=0, description="0 = none")
    db_lock_timeout_ms: int = Field(default=60_000, ge=0, description="0 = none")

    @field_validator("tta")
    @classmethod
    def _tta_views(cls, value: int) -> int:
        if value not in (1, 8):
            raise ValueError(f"ALLSCORE_TTA={value}: 1 (each cell once) or 8 (its flips and rotations)")
        return value

    @model_validator(mode="after")
    def _derive_defaults(self) -> Settings:
        if self.task_soft_time_limit >= self.task_time_limit:
            raise ValueError(
                f"ALLSCORE_TASK_SOFT_TIME_LIMIT ({self.task_soft_time_limit} s) must be below "
                f"ALLSCORE_TASK_TIME_LIMIT ({self.task_time_limit} s): the soft limit lets a sample fail cleanly "
                "before the hard limit kills the process"
            )
        if self.precision == "int8" and self.runtime == "tensorflow":
            raise ValueError(
                "ALLSCORE_PRECISION=int8 is served by ONNX Runtime or OpenVINO only: set ALLSCORE_RUNTIME=onnxruntime, "
                "openvino or auto"
            )
        self.home = self.home.expanduser()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'allscore.db'}"
        if not self.model_store:
            self.model_store = str(self.home / "models")
        if not self.broker_url:
            self.broker_url = "redis://127.0.0.1:6379/0"
        if not str(self.cache_dir) or str(self.cache_dir) == ".":
            self.cache_dir = self.home / "cache"
        self.cache_dir = self.cache_dir.expanduser()
        for name in self.model_stores:
            if not STORE_NAME_RE.match(name) or name == DEFAULT_STORE:
                raise ValueError(
                    f"ALLSCORE_MODEL_STORES: store name {name!r} must be lower-case letters, digits, '_' or '-' "
                    f"and not {DEFAULT_STORE!r} (that is ALLSCORE_MODEL_STORE)"
                )
        return self

    def stores(self) -> dict[str, str]:
        """Every model store a submission may name: the default store plus ALLSCORE_MODEL_STORES."""
        return {DEFAULT_STORE: self.model_store, **self.model_stores}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once on first use (never at import time)."""
    return Settings()


def reset_settings_cache() -> None:
    """Forget the cached settings (tests and CLI overrides change the environment)."""
    get_settings.cache_clear()


def redact(url: str) -> str:
    """Text fit to print: the password of every URL in it replaced by ***, e.g. redis://:***@redis:6379/0."""
    import re

    return re.sub(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]*@", r"\1***@", url)
