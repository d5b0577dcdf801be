"""The scoring engine: pure of Celery. Model, object fetcher and session factory are passed in."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from core.artifact import LoadedModel, ModelError
from core.contract import ScoreMessage
from core.imaging import DecodeError, decode_image
from core.inference import predict_batch
from core.storage import ObjectNotFound, StorageError, StorageUnavailable
from db import repository
from db.engine import transaction
from db.records import CellResult, SampleSummary
from db.repository import Delivery
from worker.summary import summarize_sample

log = logging.getLogger(__name__)

Fetch = Callable[[str], bytes]


@dataclass
class _Loaded:
    """One cell after fetch and decode: the pixels, or the reason it has none."""

    image: np.ndarray | None
    error: str | None


def _load_cell(uri: str, fetch: Fetch, size: int, max_pixels: int) -> _Loaded:
    try:
        data = fetch(uri)
    except StorageUnavailable:
        raise  # the store is down: the whole sample retries, no cell is marked bad for it
    except ObjectNotFound:
        return _Loaded(None, f"not found: {uri}")
    except StorageError as exc:
        return _Loaded(None, str(exc))
    try:
        return _Loaded(decode_image(data, size, source=uri, max_pixels=max_pixels), None)
    except DecodeError as exc:
        return _Loaded(None, exc.reason)


def score_cells(
    uris: Sequence[str],
    *,
    model: Any,
    size: int,
    threshold: float,
    fetch: Fetch,
    pool: ThreadPoolExecutor,
    batch_size: int = 64,
    max_pixels: int = 40_000_000,
) -> list[CellResult]:
    """Score every image in fixed-size batches; the next batch is fetched and decoded while one runs."""
    batches = [list(uris[i : i + batch_size]) for i in range(0, len(uris), batch_size)]
    results: list[CellResult] = []
    buffer = np.zeros((batch_size, size, size, 3), dtype=np.uint8)

    def submit(batch: list[str]) -> list[Future[_Loaded]]:
        return [pool.submit(_load_cell, uri, fetch, size, max_pixels) for uri in batch]

    pending = submit(batches[0]) if batches else []
    for index, batch in enumerate(batches):
        loaded = [f.result() for f in pending]
        pending = submit(batches[index + 1]) if index + 1 < len(batches) else []
        good = [i for i, cell in enumerate(loaded) if cell.image is not None]
        probs: dict[int, float] = {}
        if good:
            buffer[:] = 0
            for slot, i in enumerate(good):
                image = loaded[i].image
                assert image is not None
                buffer[slot] = image
            # Always a full batch (zero-padded), so the traced graph is reused.
            p = predict_batch(model, buffer)
            probs = {i: float(p[slot]) for slot, i in enumerate(good)}
        for i, uri in enumerate(batch):
            if i in probs:
                results.append(CellResult(uri, probs[i], probs[i] >= threshold, None))
            else:
                results.append(CellResult(uri, None, None, loaded[i].error or "not scored"))
    return results


def score_sample(
    request: ScoreMessage,
    *,
    loaded: LoadedModel,
    fetch: Fetch,
    sessions: sessionmaker[Session],
    pool: ThreadPoolExecutor,
    batch_size: int = 64,
    flag_thresholds: Sequence[float] = (0.05, 0.20, 0.25),
    max_pixels: int = 40_000_000,
) -> SampleSummary:
    """Mark the sample running, score its cells, and write cells + summary in one transaction.

    Both writes are fenced by the message's (job_id, submission): a stale delivery raises StaleDelivery and
    writes nothing (db.repository).
    """
    manifest = loaded.manifest
    version = request.model_version
    if manifest.ref != version:
        raise ModelError(f"sample {request.sample_id!r} asks for model {version} but {manifest.ref} was loaded")
    delivery = Delivery(request.job_id, request.submission)
    started = time.perf_counter()
    with transaction(sessions) as session:
        repository.mark_running(session=session, sample_id=request.sample_id, model_version=version, delivery=delivery)
    cells = score_cells(
        request.image_uris,
        model=loaded.model,
        size=manifest.input_size,
        threshold=manifest.threshold,
        fetch=fetch,
        pool=pool,
        batch_size=batch_size,
        max_pixels=max_pixels,
    )
    summary = summarize_sample(
        cells,
        sensitivity=manifest.validation.sensitivity,
        specificity=manifest.validation.specificity,
        flag_thresholds=flag_thresholds,
    )
    with transaction(sessions) as session:
        repository.record_sample_result(
            session=session,
            sample_id=request.sample_id,
            model_version=version,
            cells=cells,
            summary=summary,
            delivery=delivery,
        )
    log.info(
        "sample %s: %d cells (%d failed) in %.2fs, ALL fraction %s",
        request.sample_id,
        summary.n_cells,
        summary.n_failed,
        time.perf_counter() - started,
        "-" if summary.all_fraction is None else f"{summary.all_fraction:.3f}",
    )
    return summary
