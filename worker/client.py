"""The submit client: expand URIs, check everything a submission can get wrong, record it, then queue it."""

from __future__ import annotations

import glob
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core.artifact import Registry
from core.contract import DEFAULT_STORE, InvalidIdentifier, Kind, ScoreMessage, check_identifier
from core.errors import AllscoreError
from core.settings import Settings, get_settings, redact
from core.storage import is_s3, parse_s3, store_for, within_roots
from db import repository
from db.engine import make_engine, session_factory, transaction
from worker.celery_app import TASK_NAME, app

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")


class SubmitError(AllscoreError):
    """A submission that cannot be queued; nothing of it was queued."""


class BrokerUnavailable(SubmitError):
    """The broker did not take (all of) the job's messages; the samples not queued were failed."""

    exit_code = 5


# A sample in one of these has ended and will not change again (until it is resubmitted).
ENDED = ("done", "failed", "cancelled")


class JobTimeout(AllscoreError, TimeoutError):
    """wait_for_job's timeout passed before every sample of the job ended; `rows` is what it saw last."""

    def __init__(self, message: str, rows: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.rows = rows


def _has_image_suffix(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _check_root(uri: str, settings: Settings) -> None:
    """Local paths and s3:// URIs must sit under one of the configured roots, when roots are configured.

    A courtesy: the worker checks every URI again (core.storage.Fetcher), since anyone who can write to the
    broker can send it a task.
    """
    roots = settings.allowed_roots
    if within_roots(uri, roots):
        return
    raise SubmitError(
        f"{uri} is outside the allowed roots ({', '.join(roots)}); move the images under one of them "
        "or add a root to ALLSCORE_ALLOWED_ROOTS"
    )


def expand_uris(uris: Sequence[str], settings: Settings | None = None) -> list[str]:
    """Image URIs for a sample: s3:// keys or prefixes, local files, folders (recursive) or globs."""
    settings = settings or get_settings()
    found: list[str] = []
    checked_buckets: set[str] = set()
    for uri in uris:
        if is_s3(uri):
            _check_root(uri, settings)
            store = store_for(uri, settings)
            bucket = parse_s3(uri)[0]
            if _has_image_suffix(uri):
                # One listing per bucket proves it exists; a missing key becomes that cell's error, as
                # a HEAD per image would cost more than scoring it.
                if bucket not in checked_buckets:
                    store.list(uri)
                    checked_buckets.add(bucket)
                found.append(uri)
                continue
            listed = store.list(uri.rstrip("/") + "/", suffixes=IMAGE_SUFFIXES)
            if not listed:
                raise SubmitError(f"{uri}: no image objects ({', '.join(IMAGE_SUFFIXES)}) at that key or prefix")
            found.extend(listed)
            continue
        raw = uri.removeprefix("file://")
        path = Path(raw).expanduser()
        if any(ch in raw for ch in "*?["):
            matches = sorted(p for p in glob.glob(str(path), recursive=True) if _has_image_suffix(p))
            if not matches:
                raise SubmitError(f"{uri}: the pattern matches no image files ({', '.join(IMAGE_SUFFIXES)})")
            paths = [Path(m) for m in matches]
        elif path.is_dir():
            paths = sorted(p for p in path.rglob("*") if p.is_file() and _has_image_suffix(p.name))
            if not paths:
                raise SubmitError(f"{uri}: the folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        elif path.is_file():
            paths = [path]
        else:
            raise SubmitError(f"{uri}: no such file or folder; give an image file, a folder, a glob or s3:// URI")
        for p in paths:
            absolute = str(p.resolve())
            _check_root(absolute, settings)
            found.append(absolute)
    unique = list(dict.fromkeys(found))
    return unique


def store_name(store: str | None, settings: Settings) -> str:
    """The name of a listed model store, given its name or its root; other stores are refused."""
    stores = settings.stores()
    if store is None:
        return DEFAULT_STORE
    if store in stores:
        return store
    for name, root in stores.items():
        if store.rstrip("/") == root.rstrip("/"):
            return name
    raise SubmitError(
        f"model store {store!r} is not one the workers know ({', '.join(f'{n}={r}' for n, r in stores.items())}); "
        "give one of those names, or add the store to ALLSCORE_MODEL_STORES on the workers and the submitter"
    )


def submit_samples(
    samples: Mapping[str, Sequence[str]],
    *,
    model_ref: str | None = None,
    job_id: str | None = None,
    store: str | None = None,
    kind: Kind | Mapping[str, Kind] = "cells",
    um_per_px: float | None = None,
    notify: str | None = None,
    settings: Settings | None = None,
) -> str:
    """Queue several samples (sample_id -> URIs) as one job; return the job id.

    `notify`: a URL the workers POST the job's summary to, signed, once every sample has ended (worker.notify);
    its host must be one the operator allows (ALLSCORE_NOTIFY_HOSTS, checked here when set, and by the worker).

    All or nothing is recorded: every check runs, then the job and its samples are written in one transaction,
    then the messages are sent. If the broker fails part way, the samples not sent are marked failed and
    SubmitError says how many were queued; calling again with the same job id and samples retries the job (each
    sample's submission number moves on, so deliveries of the first try can no longer write).

    The model reference is resolved now, in the named store (a name from settings.stores(), default the
    workers' own), and sent pinned as `name:version` with that store's name. `kind` says whether the images
    are single-cell crops ("cells") or microscope fields ("fields"), for every sample or per sample.
    """
    settings = settings or get_settings()
    if not samples:
        raise SubmitError("nothing to submit: give at least one sample")
    job_id = job_id or uuid.uuid4().hex
    try:
        check_identifier(job_id, "job id")
        for sample_id in samples:
            check_identifier(sample_id, "sample id")
    except InvalidIdentifier as exc:
        raise SubmitError(str(exc)) from exc
    if notify is not None:
        from worker.notify import NotifyRefused, check_url

        try:
            check_url(notify, settings.notify_hosts or [urlsplit(notify).hostname or ""])
        except NotifyRefused as exc:
            raise SubmitError(str(exc)) from exc
    if um_per_px is not None and not 0 < um_per_px <= 100:
        raise SubmitError(f"um per pixel {um_per_px} must be above 0 and at most 100 (a typical field: 0.05-0.5)")
    kinds = {sample_id: kind if isinstance(kind, str) else kind.get(sample_id, "cells") for sample_id in samples}
    expanded = {sample_id: expand_uris(uris, settings) for sample_id, uris in samples.items()}
    for sample_id, uris in expanded.items():
        if not uris:
            raise SubmitError(f"sample {sample_id!r} has no images; give files, a folder, a glob or an s3:// prefix")
        if len(uris) > settings.max_images_per_sample:
            raise SubmitError(
                f"sample {sample_id!r} has {len(uris)} images; the limit is {settings.max_images_per_sample} "
                "(ALLSCORE_MAX_IMAGES_PER_SAMPLE): split the slide into several samples or raise the limit"
            )
    store_key = store_name(store, settings)
    registry = Registry(settings.stores()[store_key], settings)
    manifest = registry.resolve(model_ref or settings.model)
    version = manifest.ref
    version_uri = registry.version_uri(manifest.name, manifest.version)
    sessions = session_factory(make_engine(settings.database_url, settings))
    with transaction(sessions) as session:
        repository.ensure_model(
            session=session,
            name=manifest.name,
            version=manifest.version,
            uri=version_uri,
            sha256=manifest.sha256,
            sensitivity=manifest.validation.sensitivity,
            specificity=manifest.validation.specificity,
            threshold=manifest.threshold,
        )
        repository.create_job(
            session=session,
            job_id=job_id,
            n_samples=len(expanded),
            retry_of=[(sample_id, version) for sample_id in expanded],
            notify_url=notify,
        )
        messages = [
            ScoreMessage(
                job_id=job_id,
                sample_id=sample_id,
                image_uris=tuple(uris),
                model_version=version,
                model_store=store_key,
                submission=repository.enqueue_sample(
                    session=session, job_id=job_id, sample_id=sample_id, model_version=version, kind=kinds[sample_id]
                ).submission,
                kind=kinds[sample_id],
                um_per_px=um_per_px,
            )
            for sample_id, uris in expanded.items()
        ]
    sent = []
    try:
        # The broker of these settings (not whichever the app read first), as for the database above.
        with app.connection_for_write(settings.broker_url) as connection:
            for message in messages:
                app.send_task(TASK_NAME, kwargs=message.to_kwargs(), queue=settings.queue, connection=connection)
                sent.append(message.sample_id)
    except Exception as exc:
        with transaction(sessions) as session:
            for message in messages:
                if message.sample_id not in sent:
                    repository.mark_failed(
                        session=session,
                        sample_id=message.sample_id,
                        model_version=version,
                        error=f"could not be queued: {exc}",
                        delivery=repository.Delivery(job_id, message.submission),
                    )
        raise BrokerUnavailable(
            f"the broker at {redact(settings.broker_url)} did not take the job ({redact(str(exc))}); {len(sent)} of "
            f"{len(expanded)} samples were queued; check ALLSCORE_BROKER_URL and resubmit"
        ) from exc
    log.info("job %s: queued %d samples for %s", job_id, len(sent), version)
    return job_id


def submit_sample(
    sample_id: str,
    uris: Sequence[str],
    *,
    model_ref: str | None = None,
    job_id: str | None = None,
    store: str | None = None,
    kind: Kind = "cells",
    um_per_px: float | None = None,
    notify: str | None = None,
    settings: Settings | None = None,
) -> str:
    """Queue one sample (its image URIs) for scoring; return the job id."""
    return submit_samples(
        {sample_id: uris},
        model_ref=model_ref,
        job_id=job_id,
        store=store,
        kind=kind,
        um_per_px=um_per_px,
        notify=notify,
        settings=settings,
    )


def job_results(job_id: str, *, settings: Settings | None = None) -> list[dict[str, Any]]:
    """The job's rows of the view sample_results (one per sample and model version), by sample id."""
    settings = settings or get_settings()
    engine = make_engine(settings.database_url, settings)
    try:
        with session_factory(engine)() as session:
            return repository.get_sample_results(session=session, job_id=job_id)
    finally:
        engine.dispose()


def wait_for_job(
    job_id: str,
    *,
    timeout: float | None = 3600.0,
    poll: float = 0.5,
    settings: Settings | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Wait until every sample of job `job_id` has ended (done, failed or cancelled); return its sample_results rows.

    Polls the database every `poll` seconds; `on_progress(ended, total)` after each poll. Raises JobNotFoundError
    for a job that does not exist, and JobTimeout (with the last rows) once `timeout` seconds pass (None: no limit).
    A sample of the job that was resubmitted under another job leaves this one and is not waited for.
    """
    from db.errors import JobNotFoundError
    from db.models import Job

    settings = settings or get_settings()
    engine = make_engine(settings.database_url, settings)  # one engine (and pool) for every poll
    sessions = session_factory(engine)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        with sessions() as session:
            if session.get(Job, job_id) is None:
                raise JobNotFoundError(f"no job {job_id!r}; `allscore submit` prints the job id on its last line")
        while True:
            # The job and its samples were written in one transaction: every row still the job's is waited for.
            with sessions() as session:
                rows = repository.get_sample_results(session=session, job_id=job_id)
            ended = sum(1 for r in rows if r["status"] in ENDED)
            if on_progress is not None:
                on_progress(ended, len(rows))
            if ended == len(rows):
                return rows
            if deadline is not None and time.monotonic() >= deadline:
                waiting = [f"{r['sample_id']} ({r['status']})" for r in rows if r["status"] not in ENDED]
                raise JobTimeout(
                    f"job {job_id}: {ended} of {len(rows)} samples ended after {timeout:g} s; still waiting for "
                    f"{', '.join(waiting[:10])}{' ...' if len(waiting) > 10 else ''}",
                    rows,
                )
            time.sleep(poll)
    finally:
        engine.dispose()


def cancel(
    sample_ids: Sequence[str] | None = None,
    *,
    job_id: str | None = None,
    settings: Settings | None = None,
) -> list[repository.Cancelled]:
    """Cancel the queued and running samples named (by sample id and/or job): a queued one is never run, a running
    one stops before its next batch; neither writes a result. Returns the samples cancelled (those that had ended
    already are left as they were)."""
    from db.errors import JobNotFoundError

    if not sample_ids and not job_id:
        raise SubmitError("name the samples to cancel, or a job")
    settings = settings or get_settings()
    engine = make_engine(settings.database_url, settings)
    try:
        with transaction(session_factory(engine)) as session:
            if job_id is not None:
                from db.models import Job

                if session.get(Job, job_id) is None:
                    raise JobNotFoundError(f"no job {job_id!r}")
            cancelled = repository.cancel_samples(
                session=session, sample_ids=list(sample_ids) if sample_ids else None, job_id=job_id
            )
    finally:
        engine.dispose()
    for item in cancelled:
        log.info("cancelled sample %s (%s), which was %s", item.sample_id, item.model_version, item.was)
    return cancelled
