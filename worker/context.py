"""Per-process worker state, made lazily after the fork: settings, sessions, stores, I/O pool, model cache."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

from sqlalchemy.orm import Session, sessionmaker

from core.artifact import LoadedModel, Registry, load_keras, parse_ref
from core.inference import ServingModel, configure_tensorflow
from core.settings import Settings, get_settings
from core.storage import Fetcher
from db.engine import make_engine, session_factory

log = logging.getLogger(__name__)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under taskset or a container limit)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def tf_threads_for(settings: Settings) -> int:
    """This process's share of the cores: ALLSCORE_TF_THREADS, else cores / worker processes."""
    if settings.tf_threads:
        return settings.tf_threads
    cores = available_cores()
    processes = settings.worker_concurrency or cores
    return max(1, cores // processes)


def io_threads_for(settings: Settings) -> int:
    """Fetch/decode threads: ALLSCORE_IO_THREADS, else the process's cores (at least 2, so one can wait on I/O)."""
    if settings.io_threads:
        return settings.io_threads
    return max(2, available_cores())


class WorkerContext:
    """Everything a worker process keeps between tasks; the model is loaded once per version."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        configure_tensorflow(tf_threads_for(settings))
        self.sessions: sessionmaker[Session] = session_factory(make_engine(settings.database_url))
        self.registry = Registry(settings=settings)
        self.pool = ThreadPoolExecutor(max_workers=io_threads_for(settings), thread_name_prefix="allscore-io")
        self._models: dict[str, LoadedModel] = {}
        self.fetch = Fetcher(settings)
        self._lock = threading.Lock()

    def model(self, ref: str) -> LoadedModel:
        """The model for a reference, loaded on first use and cached by version."""
        parsed = parse_ref(ref)
        # A pinned name:version (what `submit` sends) needs no store round trip once cached.
        key = f"{parsed.name}:{parsed.version}" if parsed.version else self.registry.resolve(parsed).ref
        with self._lock:
            cached = self._models.get(key)
            if cached is not None:
                return cached
            started = time.perf_counter()
            path, manifest = self.registry.fetch(ref)
            model = ServingModel(load_keras(path), self.settings.precision)
            loaded = LoadedModel(model=model, manifest=manifest, path=path)
            self._models[key] = loaded
        log.info("model loaded: %s in pid %d (%.2fs)", key, os.getpid(), time.perf_counter() - started)
        return loaded


@lru_cache(maxsize=1)
def get_context() -> WorkerContext:
    """The process's worker context, created on first use (after the fork, in each child)."""
    return WorkerContext(get_settings())
