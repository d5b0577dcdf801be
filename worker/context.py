"""Per-process worker state, made lazily after the fork: settings, sessions, stores, I/O pool, model cache."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

from sqlalchemy.orm import Session, sessionmaker

from core import cpus
from core.artifact import LoadedModel, Registry
from core.contract import DEFAULT_STORE
from core.inference import configure_tensorflow
from core.manifest import ModelError, ModelNotFound, parse_ref
from core.runtimes import choose_serving, load_runtime_model, tensorflow_imported
from core.settings import Settings, get_settings
from core.storage import Fetcher
from db.engine import make_engine, session_factory
from worker import metrics

log = logging.getLogger(__name__)


def available_cores() -> int:
    """The cores this process may use: the cgroup CPU limit (a container's, a pod's), then its CPU affinity."""
    return cpus.available_cores().count


def tf_threads_for(settings: Settings, cores: int | None = None) -> int:
    """This process's share of the cores: ALLSCORE_TF_THREADS, else cores / worker processes (at least 1)."""
    if settings.tf_threads:
        return settings.tf_threads
    cores = cores or available_cores()
    processes = settings.worker_concurrency or cores
    return max(1, cores // processes)


def io_threads_for(settings: Settings, cores: int | None = None) -> int:
    """Fetch/decode threads: ALLSCORE_IO_THREADS, else the process's cores (at least 2, so one can wait on I/O)."""
    if settings.io_threads:
        return settings.io_threads
    return max(2, cores or available_cores())


# billiard (Celery's prefork pool) raises a task's soft time limit in the pool process on this signal.
_SOFT_LIMIT_SIGNAL = getattr(signal, "SIGUSR1", None)


@contextlib.contextmanager
def soft_limit_waits() -> Iterator[None]:
    """Hold a task's soft time limit back until the block is over, where it is raised as usual.

    Importing TensorFlow/Keras and loading a model take seconds on a loaded host. A soft limit raised in the middle
    of an import leaves half-imported modules behind (libraries that catch Exception around optional imports swallow
    it), and every later task in the process then fails with an AttributeError instead of its reason. Inside the
    block the signal's handler only notes that it came; after it, the pool's handler is put back and the signal
    raised again, so the limit is raised right there. (Blocking the signal would not do: the process has other
    threads, and the kernel hands a process's signal to any thread that does not block it.) The hard limit still
    applies.
    """
    if _SOFT_LIMIT_SIGNAL is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous = signal.signal(_SOFT_LIMIT_SIGNAL, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        signal.signal(_SOFT_LIMIT_SIGNAL, previous if previous is not None else signal.SIG_DFL)
        if came:
            signal.raise_signal(_SOFT_LIMIT_SIGNAL)


class WorkerContext:
    """Everything a worker process keeps between tasks; the model is loaded once per version."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # TensorFlow is configured (and so imported) only where it may serve: never for ALLSCORE_RUNTIME=onnxruntime,
        # and for auto only when a version without an ONNX export first needs it.
        self._tf_configured = False
        if settings.runtime == "tensorflow":
            self._configure_tensorflow()
        self.sessions: sessionmaker[Session] = session_factory(make_engine(settings.database_url, settings))
        self.stores = settings.stores()
        self.pool = ThreadPoolExecutor(max_workers=io_threads_for(settings), thread_name_prefix="allscore-io")
        self._models: dict[tuple[str, str], LoadedModel] = {}
        self.fetch = Fetcher(settings)
        self._lock = threading.Lock()

    def model(self, version: str, store: str = DEFAULT_STORE) -> LoadedModel:
        """Model `name:version` from the named store, loaded on first use and cached by (store, version).

        Only this worker's own stores (ALLSCORE_MODEL_STORE and ALLSCORE_MODEL_STORES) are read, by name: a
        message cannot point the worker at a model anywhere else, and a model cached for one store is never
        served for another.
        """
        parsed = parse_ref(version)
        if parsed.version is None or parsed.name is None:
            raise ModelError(f"model {version!r} is not pinned; a task names name:version")
        root = self.stores.get(store)
        if root is None:
            raise ModelNotFound(
                f"model store {store!r} is not one of this worker's stores ({', '.join(sorted(self.stores))}); "
                "add it to ALLSCORE_MODEL_STORES on the workers, or submit with a listed --store"
            )
        key = (store, f"{parsed.name}:{parsed.version}")
        with self._lock:
            cached = self._models.get(key)
            if cached is not None:
                return cached
            started = time.perf_counter()
            registry = Registry(root, self.settings)
            manifest = registry.resolve(parsed)
            if manifest.ref != key[1]:
                raise ModelError(f"store {store!r} answered {version} with model {manifest.ref}; republish it")
            serving = choose_serving(self.settings.runtime, self.settings.precision, manifest.exports)
            if serving.export is not None:
                # ExportMissing, with the command that makes the export, for a version without one.
                path, manifest = registry.fetch_export(parsed, serving.export)
            else:
                path, manifest = registry.fetch(parsed)
                self._configure_tensorflow()
            with soft_limit_waits():
                model = load_runtime_model(serving.runtime, path, serving.precision, tf_threads_for(self.settings))
            loaded = LoadedModel(model=model, manifest=manifest, path=path)
            self._models[key] = loaded
        seconds = time.perf_counter() - started
        metrics.MODEL_LOADS.labels(model.runtime, model.precision).inc()
        metrics.MODEL_LOAD_SECONDS.observe(seconds)
        log.info(
            "model loaded: %s in pid %d (%.2fs) from store %s; runtime %s, %s (tensorflow %s in this process); "
            "chosen for %s; stain normalisation %s",
            key[1],
            os.getpid(),
            seconds,
            store,
            model.runtime,
            model.precision,
            "imported" if tensorflow_imported() else "not imported",
            serving.why,
            "none" if manifest.stain_norm is None else f"per sample ({manifest.stain_norm.method})",
        )
        return loaded

    def _configure_tensorflow(self) -> None:
        """Import and configure TensorFlow once, before its first op (the soft time limit waits for it)."""
        if self._tf_configured:
            return
        with soft_limit_waits():
            configure_tensorflow(tf_threads_for(self.settings))
        self._tf_configured = True


@lru_cache(maxsize=1)
def get_context() -> WorkerContext:
    """The process's worker context, created on first use (after the fork, in each child)."""
    return WorkerContext(get_settings())
