"""The scoring engine: pure of Celery. Model, object fetcher and session factory are passed in."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from core.artifact import LoadedModel
from core.calibration import apply_temperature
from core.contract import LYMPHOID, CellResult, FieldRecord, SampleSummary, ScoreMessage
from core.errors import AllscoreError
from core.inference import predict_batch
from core.manifest import ModelError, ModelManifest
from core.segment import CNMC_UM_PER_PX
from core.stainnorm import FIT_CELLS, StainStats, normalise
from core.stainnorm import fit as fit_stain
from core.tta import averaged
from db import repository
from db.engine import transaction
from db.repository import Delivery
from worker.fields import Decoded, Fetch, Item, Unit, read_cell, read_field, sample_scale
from worker.summary import summarize_sample

log = logging.getLogger(__name__)


class SampleTooLarge(AllscoreError):
    """A field sample held more cells than ALLSCORE_MAX_CELLS_PER_SAMPLE allows."""


class PoisonSample(AllscoreError):
    """Processing this sample has killed its worker process too many times; it is failed, not redelivered."""


@dataclass(frozen=True)
class Hooks:
    """What the engine tells its caller while it scores (metrics), and asks it (whether to stop).

    `batch(cells, seconds)` after each forward pass; `read(seconds)` after each image is fetched and decoded (in
    an I/O thread); `check()` before each batch: it raises to stop the sample there (a cancellation).
    """

    batch: Callable[[int, float], None] | None = None
    read: Callable[[float], None] | None = None
    check: Callable[[], None] | None = None


def _timed(read: Callable[[str], Unit], observe: Callable[[float], None]) -> Callable[[str], Unit]:
    def timed(uri: str) -> Unit:
        started = time.perf_counter()
        try:
            return read(uri)
        finally:
            observe(time.perf_counter() - started)

    return timed


def score_units(
    uris: Sequence[str],
    read: Callable[[str], Unit],
    *,
    model: Any,
    size: int,
    threshold: float,
    temperature: float = 1.0,
    tta: int = 1,
    pool: ThreadPoolExecutor,
    batch_size: int = 64,
    max_cells: int | None = None,
    hooks: Hooks | None = None,
    stain: StainStats | None = None,
    fit_cells: int = FIT_CELLS,
) -> tuple[list[CellResult], list[Unit]]:
    """Read every image on the I/O pool (a window of reads ahead) and score what they hold in fixed-size batches.

    Results come in the order of `uris`, and within a field in the order of its cells. A read keeps running
    while the model scores the batch before it. Returns the cell results and the units (for field counts).

    With `stain` (the version's per-sample stain normalisation target), the first `fit_cells` cells read are held
    back until the sample's own statistics are fitted on them (all its cells when it has fewer); every batch,
    those cells' included, is then normalised onto `stain` before the forward pass.
    """
    window = max(1, batch_size)
    results: list[CellResult | None] = []
    units: list[Unit] = []
    buffer = np.zeros((batch_size, size, size, 3), dtype=np.uint8)
    waiting: list[tuple[int, Item]] = []  # (row, item) whose pixels are in the buffer
    held: list[tuple[int, Item]] = []  # (row, item) read before the sample's stain statistics were fitted
    source: StainStats | None = None  # the sample's own stain statistics (with `stain`)
    n_found = 0
    hooks = hooks or Hooks()
    if hooks.read is not None:
        read = _timed(read, hooks.read)

    def run_batch() -> None:
        if not waiting:
            return
        if hooks.check is not None:
            hooks.check()
        # Always a full batch (zero-padded), so the traced graph is reused.
        buffer[len(waiting) :] = 0
        started = time.perf_counter()
        x = buffer if stain is None or source is None else normalise(buffer, source, stain)
        p = apply_temperature(averaged(partial(predict_batch, model), x, tta), temperature)
        if hooks.batch is not None:
            hooks.batch(len(waiting), time.perf_counter() - started)
        for slot, (row, item) in enumerate(waiting):
            prob = float(p[slot])
            results[row] = CellResult(item.image_uri, prob, prob >= threshold, None, item.field)
        waiting.clear()

    def enqueue(row: int, item: Item) -> None:
        assert item.image is not None
        buffer[len(waiting)] = item.image
        item.image = None
        waiting.append((row, item))
        if len(waiting) == batch_size:
            run_batch()

    def release_held() -> None:
        # The sample's statistics from the cells held back, then those cells scored as any other.
        nonlocal source
        if stain is None or source is not None or not held:
            return
        source = fit_stain(np.stack([item.image for _, item in held if item.image is not None]))
        for row, item in held:
            enqueue(row, item)
        held.clear()

    pending: deque[Future[Unit]] = deque(pool.submit(read, uri) for uri in uris[:window])
    next_uri = len(pending)
    while pending:
        unit = pending.popleft().result()
        if next_uri < len(uris):
            pending.append(pool.submit(read, uris[next_uri]))
            next_uri += 1
        units.append(unit)
        n_found += len(unit.items)
        if max_cells is not None and n_found > max_cells:
            for future in pending:
                future.cancel()
            raise SampleTooLarge(
                f"the sample's fields hold more than {max_cells} cells (ALLSCORE_MAX_CELLS_PER_SAMPLE); "
                "split the slide into several samples or raise the limit"
            )
        for item in unit.items:
            if item.image is None:
                results.append(CellResult(item.image_uri, None, None, item.error, item.field))
                continue
            results.append(None)
            if stain is not None and source is None:
                held.append((len(results) - 1, item))
                if len(held) >= fit_cells:
                    release_held()
            else:
                enqueue(len(results) - 1, item)
    release_held()
    run_batch()
    assert all(r is not None for r in results)
    return [r for r in results if r is not None], units


def field_records(units: Sequence[Unit]) -> list[FieldRecord]:
    """One record per field read, in the order submitted: its scale and what was found in it (or its error)."""
    records = []
    for index, unit in enumerate(units):
        found = [item.field for item in unit.items if item.field is not None]
        records.append(
            FieldRecord(
                field_uri=unit.uri,
                field_index=index,
                um_per_px=unit.um_per_px,
                scale_source=unit.scale_source,
                n_found=len(found),
                n_scored=sum(1 for f in found if f.scored),
                n_other=sum(1 for f in found if f.cell_kind != LYMPHOID),
                n_edge=sum(1 for f in found if f.cell_kind == LYMPHOID and f.edge),
                error=unit.error,
            )
        )
    return records


def score_cells(
    uris: Sequence[str],
    *,
    model: Any,
    size: int,
    threshold: float,
    temperature: float = 1.0,
    tta: int = 1,
    fetch: Fetch,
    pool: ThreadPoolExecutor,
    batch_size: int = 64,
    max_pixels: int = 40_000_000,
    stain: StainStats | None = None,
) -> list[CellResult]:
    """Score single-cell images in fixed-size batches; the next ones are fetched and decoded while one runs.
    `stain`: the version's stain normalisation target (`stain_target(manifest)`), the images being one sample."""
    cells, _ = score_units(
        uris,
        partial(read_cell, fetch=fetch, size=size, max_pixels=max_pixels),
        model=model,
        size=size,
        threshold=threshold,
        temperature=temperature,
        tta=tta,
        pool=pool,
        batch_size=batch_size,
        stain=stain,
    )
    return cells


def stain_target(manifest: ModelManifest) -> StainStats | None:
    """The version's per-sample stain normalisation target, None when it was trained without one."""
    return manifest.stain_norm.target() if manifest.stain_norm is not None else None


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
    low_count: int = 0,
    max_cells: int | None = None,
    retries: int = 0,
    max_deaths: int | None = None,
    hooks: Hooks | None = None,
    tta: int = 1,
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
        attempts = repository.mark_running(
            session=session, sample_id=request.sample_id, model_version=version, delivery=delivery
        )
    # Each start counts. Starts before this one that neither finished nor retried (`retries` counts those) ended
    # with their worker process: killed (OOM, SIGKILL) or lost, and the message redelivered.
    deaths = attempts - 1 - retries
    if max_deaths is not None and deaths >= max_deaths:
        raise PoisonSample(
            f"the worker died {deaths} times on this sample (ALLSCORE_MAX_WORKER_DEATHS={max_deaths}); it is not "
            "redelivered again: check the workers' logs and memory, split the sample or look for a bad image"
        )
    size = manifest.input_size
    if request.kind == "fields":
        um_per_px, source = request.um_per_px, "given"
        decoded = Decoded()
        if um_per_px is None:
            um_per_px = sample_scale(request.image_uris, fetch, pool, max_pixels=max_pixels, decoded=decoded)
            source = "estimated"
        read = partial(
            read_field,
            fetch=fetch,
            size=size,
            train_um_per_px=manifest.um_per_px or CNMC_UM_PER_PX,
            um_per_px=um_per_px,
            max_pixels=max_pixels,
            scale_source=source,
            decoded=decoded,
        )
    else:
        read = partial(read_cell, fetch=fetch, size=size, max_pixels=max_pixels)
    cells, units = score_units(
        request.image_uris,
        read,
        model=loaded.model,
        size=size,
        threshold=manifest.threshold,
        temperature=manifest.temperature,
        tta=tta,
        pool=pool,
        batch_size=batch_size,
        max_cells=max_cells if request.kind == "fields" else None,
        hooks=hooks,
        stain=stain_target(manifest),
        fit_cells=manifest.stain_norm.fit_cells if manifest.stain_norm is not None else FIT_CELLS,
    )
    fields = field_records(units) if request.kind == "fields" else None
    summary = summarize_sample(
        cells,
        sensitivity=manifest.validation.sensitivity,
        specificity=manifest.validation.specificity,
        flag_thresholds=flag_thresholds,
        low_count=low_count,
        fields=fields,
    )
    with transaction(sessions) as session:
        repository.record_sample_result(
            session=session,
            sample_id=request.sample_id,
            model_version=version,
            cells=cells,
            summary=summary,
            delivery=delivery,
            fields=fields or (),
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
