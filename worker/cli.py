"""The scoring service's commands: `worker`, `submit`, `status`, `report`."""

from __future__ import annotations

import csv
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from core.console import stderr_console, stdout_console
from core.errors import EXIT_NOT_FOUND
from core.settings import get_settings, reset_settings_cache

err = stderr_console()
out = stdout_console()
FINAL = ("done", "failed", "cancelled")  # a sample in one of these has ended
# Exit codes (README, "Exit codes"): 1 a sample failed or was cancelled (submit --wait); 4 nothing found.
NOT_FOUND = EXIT_NOT_FOUND


def worker_cmd(
    concurrency: Annotated[
        int | None,
        typer.Option(help="worker processes; default ALLSCORE_WORKER_CONCURRENCY or the number of cores"),
    ] = None,
    queues: Annotated[str | None, typer.Option(help="comma-separated queues; default ALLSCORE_QUEUE")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
    pool: Annotated[str, typer.Option(help="Celery pool: prefork (default) or solo")] = "prefork",
) -> None:
    """Run a Celery worker that scores samples (one model load per process)."""
    if concurrency is not None:
        os.environ["ALLSCORE_WORKER_CONCURRENCY"] = str(concurrency)
        reset_settings_cache()
    settings = get_settings()
    if settings.metrics_port:
        # Before prometheus-client is first imported: every process, main and forked, then counts into files.
        _prepare_metrics_dir()
    from core.cpus import available_cores
    from worker.context import io_threads_for, tf_threads_for

    cores = available_cores()
    n = settings.worker_concurrency or cores.count
    # Children read this to split the cores between them (see worker.context.tf_threads_for).
    os.environ["ALLSCORE_WORKER_CONCURRENCY"] = str(n)
    reset_settings_cache()
    sized = get_settings()
    err.print(
        f"sizing: {cores.describe()}; worker processes {n}, each with {tf_threads_for(sized, cores.count)} "
        f"TensorFlow threads and {io_threads_for(sized, cores.count)} I/O threads",
        highlight=False,
    )
    consumed = [q.strip() for q in (queues or settings.queue).split(",") if q.strip()]
    if settings.metrics_port:
        from core.errors import AllscoreError
        from worker.metrics import serve

        try:
            serve(settings, consumed, settings.metrics_port)
        except OSError as exc:
            raise AllscoreError(
                f"cannot serve metrics and /healthz on port {settings.metrics_port} ({exc}); set "
                "ALLSCORE_METRICS_PORT to a free port, or 0 for none"
            ) from exc
    from worker.celery_app import app, log_to_json

    if settings.log_format == "json":
        log_to_json(loglevel)
    app.worker_main(
        [
            "worker",
            f"--loglevel={loglevel}",
            f"--concurrency={n}",
            f"--pool={pool}",
            f"--queues={','.join(consumed)}",
            f"--hostname=allscore-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
    )


def _prepare_metrics_dir() -> None:
    """A fresh folder for prometheus-client's multiprocess files in PROMETHEUS_MULTIPROC_DIR (emptied if given)."""
    import tempfile

    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before its multiprocess folder was set")
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not given:
        import atexit
        import shutil

        made = tempfile.mkdtemp(prefix="allscore-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
        main_pid = os.getpid()

        def remove() -> None:
            if os.getpid() == main_pid:  # the main process's exit only, never a pool process's
                shutil.rmtree(made, ignore_errors=True)

        atexit.register(remove)
        return
    folder = Path(given)
    folder.mkdir(parents=True, exist_ok=True)
    for item in folder.glob("*.db"):  # an earlier run's counts would be added again
        item.unlink()


def _read_manifest_csv(path: Path, default_kind: str) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Samples and their kinds from a CSV: sample_id,uri and an optional kind (cells or fields) per row."""
    from worker.client import SubmitError

    samples: dict[str, list[str]] = defaultdict(list)
    kinds: dict[str, Any] = {}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"sample_id", "uri"} <= set(reader.fieldnames):
            raise SubmitError(f"{path}: the manifest CSV needs the columns sample_id,uri (one row per URI)")
        for line, row in enumerate(reader, start=2):
            if not row["sample_id"] or not row["uri"]:
                raise SubmitError(f"{path}, line {line}: empty sample_id or uri")
            kind = (row.get("kind") or default_kind).strip()
            if kind not in ("cells", "fields"):
                raise SubmitError(f"{path}, line {line}: kind {kind!r} must be cells or fields")
            if kinds.setdefault(row["sample_id"], kind) != kind:
                raise SubmitError(
                    f"{path}, line {line}: sample {row['sample_id']!r} mixes kinds; a sample is all cells or all fields"
                )
            samples[row["sample_id"]].append(row["uri"])
    return dict(samples), kinds


def submit_cmd(
    sample_id: Annotated[str | None, typer.Argument(metavar="SAMPLE_ID")] = None,
    uris: Annotated[list[str] | None, typer.Argument(metavar="URI...", help="files, folders, globs, s3://")] = None,
    model: Annotated[str | None, typer.Option(help="model reference; default ALLSCORE_MODEL")] = None,
    store: Annotated[
        str | None,
        typer.Option(help="a model store the workers list (ALLSCORE_MODEL_STORES), by name or root; default theirs"),
    ] = None,
    job: Annotated[str | None, typer.Option(help="job id; default a new uuid")] = None,
    manifest: Annotated[
        Path | None, typer.Option(help="CSV with columns sample_id,uri and optionally kind (cells or fields)")
    ] = None,
    fields: Annotated[
        bool, typer.Option("--fields", help="the images are microscope fields: find and cut out the white cells")
    ] = False,
    um_per_px: Annotated[
        float | None, typer.Option(help="fields' scale in um per pixel; default: estimated from the red cells")
    ] = None,
    notify: Annotated[
        str | None,
        typer.Option(help="POST the job's summary here, signed, once every sample has ended (ALLSCORE_NOTIFY_HOSTS)"),
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="show progress until done; exit 1 if any failed")] = False,
    timeout: Annotated[float, typer.Option(help="seconds --wait waits at most")] = 3600.0,
) -> None:
    """Queue samples for scoring; prints the job id."""
    from worker.client import submit_samples

    default_kind = "fields" if fields else "cells"
    kinds: Any = default_kind
    if manifest is not None:
        if sample_id or uris:
            raise typer.BadParameter("give either SAMPLE_ID URI... or --manifest CSV, not both")
        samples, kinds = _read_manifest_csv(manifest, default_kind)
    else:
        if not sample_id or not uris:
            raise typer.BadParameter("give SAMPLE_ID and at least one URI (or --manifest CSV)")
        samples = {sample_id: uris}
    job_id = submit_samples(
        samples, model_ref=model, job_id=job, store=store, kind=kinds, um_per_px=um_per_px, notify=notify
    )
    err.print(f"queued {len(samples)} sample(s) as job {job_id}")
    typer.echo(job_id)
    if wait:
        rows = wait_for_job(job_id, len(samples), timeout)
        failed = [r for r in rows if r["status"] in ("failed", "cancelled")]
        for r in failed:
            err.print(f"[red]{r['status']}[/] {r['sample_id']}: {r['error']}")
        if failed or len(rows) < len(samples) or any(r["status"] not in FINAL for r in rows):
            sys.exit(1)


def wait_for_job(job_id: str, n_samples: int, timeout: float) -> list[dict[str, Any]]:
    """worker.client.wait_for_job with a progress bar; the rows it saw last when the timeout passes."""
    from worker.client import JobTimeout
    from worker.client import wait_for_job as wait

    with Progress(
        TextColumn("[bold]scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    ) as progress:
        task = progress.add_task("samples", total=n_samples)
        try:
            return wait(job_id, timeout=timeout, on_progress=lambda ended, _: progress.update(task, completed=ended))
        except JobTimeout as exc:
            return exc.rows


def _results(sample_ids: list[str] | None, job: str | None) -> list[dict[str, Any]]:
    from db import repository
    from db.engine import make_engine, session_factory

    with session_factory(make_engine())() as session:
        return repository.get_sample_results(session=session, sample_ids=sample_ids or None, job_id=job)


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.1%}"


def results_table(rows: list[dict[str, Any]], title: str, reviews: bool = False) -> Table:
    """The sample results as a rich table (with `reviews`, the reviewed fraction and the sign-off too)."""
    table = Table(title=title)
    for col in (
        "sample",
        "status",
        "model",
        "cells",
        "ALL",
        "failed",
        "ALL fraction",
        "95% CI",
        "corrected",
        "flags",
    ):
        table.add_column(col, justify="right" if col in ("cells", "ALL", "failed") else "left")
    if reviews:
        table.add_column("reviewed")
        table.add_column("signed off")
    for r in rows:
        ci = "-" if r["ci_low"] is None else f"{r['ci_low']:.1%}-{r['ci_high']:.1%}"
        review_cells = []
        if reviews:
            reviewed = f"{_pct(r['reviewed_fraction'])} ({r['n_reviewed']} cells)" if r.get("n_reviewed") else "-"
            signed = f"{r['signed_off_by']} {r['signed_off_at']:%Y-%m-%d}" if r.get("signed_off_by") else "-"
            review_cells = [reviewed, signed]
        table.add_row(
            str(r["sample_id"]),
            str(r["status"]),
            str(r["model_version"]),
            str(r["n_cells"] or "-"),
            str(r["n_all"] if r["n_all"] is not None else "-"),
            str(r["n_failed"] if r["n_failed"] is not None else "-"),
            _pct(r["all_fraction"]),
            ci,
            _pct(r["corrected_fraction"]),
            str(r["flags"] or r["error"] or ""),
            *review_cells,
        )
    return table


def status_cmd(
    sample_id: Annotated[str | None, typer.Argument(metavar="SAMPLE_ID")] = None,
    job: Annotated[str | None, typer.Option(help="job id")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="the sample_results rows as a JSON list")] = False,
) -> None:
    """Status of a sample or a job (queued, running, done, failed, cancelled)."""
    if not sample_id and not job:
        raise typer.BadParameter("give a SAMPLE_ID or --job JOB")
    rows = _results([sample_id] if sample_id else None, job)
    if not rows:
        err.print(f"no such {'sample' if sample_id else 'job'}: {sample_id or job}")
        raise typer.Exit(NOT_FOUND)
    if as_json:
        from worker.report import to_json

        typer.echo(to_json(rows))
        return
    out.print(results_table(rows, f"status of {sample_id or 'job ' + str(job)}"))


def cancel_cmd(
    sample_ids: Annotated[list[str] | None, typer.Argument(metavar="SAMPLE_ID...")] = None,
    job: Annotated[str | None, typer.Option(help="cancel every sample of this job still queued or running")] = None,
) -> None:
    """Cancel samples: a queued one is never run, a running one stops at its next batch; neither writes a result."""
    from worker.client import cancel

    if not sample_ids and not job:
        raise typer.BadParameter("give SAMPLE_ID... or --job JOB")
    cancelled = cancel(sample_ids, job_id=job)
    for item in cancelled:
        typer.echo(f"{item.sample_id}\t{item.model_version}\twas {item.was}")
    if not cancelled:
        rows = _results(sample_ids or None, job)
        if not rows:
            err.print(f"no such {'job' if job else 'sample'}: {job or ', '.join(sample_ids or [])}")
            raise typer.Exit(NOT_FOUND)
        ended = ", ".join(f"{r['sample_id']} {r['status']}" for r in rows)
        err.print(f"nothing to cancel: every sample named has ended ({ended})")
        raise typer.Exit(NOT_FOUND)
    err.print(f"cancelled {len(cancelled)} sample(s)")


def report_cmd(
    sample_ids: Annotated[list[str] | None, typer.Argument(metavar="SAMPLE_ID...")] = None,
    job: Annotated[str | None, typer.Option(help="job id")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table | csv | json")] = "table",
    montage: Annotated[Path | None, typer.Option(help="write one montage PNG per sample into this folder")] = None,
    overlays: Annotated[
        Path | None, typer.Option(help="field samples: write each field with its cells outlined into this folder")
    ] = None,
    with_reviews: Annotated[
        bool, typer.Option("--reviews", help="add the reviewers' verdicts and sign-offs (view sample_reviews)")
    ] = False,
) -> None:
    """Per-sample results (the view sample_results), as a table, CSV or JSON; optionally montages."""
    from db import repository
    from db.engine import make_engine, session_factory
    from worker.report import render_montage, render_overlays, to_csv, to_json

    if fmt not in ("table", "csv", "json"):
        raise typer.BadParameter(f"--format {fmt!r}: choose table, csv or json")
    rows = _results(sample_ids, job)
    if with_reviews:
        from worker.report import add_reviews

        with session_factory(make_engine())() as session:
            rows = add_reviews(rows, session)
    if fmt == "csv":
        typer.echo(to_csv(rows), nl=False)
    elif fmt == "json":
        typer.echo(to_json(rows))
    else:
        out.print(results_table(rows, "sample results", reviews=with_reviews))
    if montage is None and overlays is None:
        return
    with session_factory(make_engine())() as session:
        for row in rows:
            if row["status"] != "done":
                continue
            cells = repository.get_cell_results(
                session=session, sample_id=row["sample_id"], model_version=row["model_version"]
            )
            if montage is not None:
                err.print(f"montage: {render_montage(row, cells, montage)}")
            if overlays is not None and row.get("kind") == "fields":
                fields = repository.get_field_results(
                    session=session, sample_id=row["sample_id"], model_version=row["model_version"]
                )
                for path in render_overlays(row, cells, overlays, fields=fields):
                    err.print(f"overlay: {path}")


def sweep_cmd(
    every: Annotated[
        float | None, typer.Option(help="repeat every this many seconds (the compose sweeper); default once")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what would be failed; change nothing")] = False,
) -> None:
    """Fail the samples no worker will finish: running past the hard time limit, or queued with no message."""
    from worker.sweep import sweep

    while True:
        report = sweep(get_settings(), dry_run=dry_run)
        err.print(report.describe() + (" (dry run)" if dry_run else ""))
        for sample_id in report.stuck_running + report.lost_queued:
            typer.echo(sample_id)
        if every is None:
            return
        time.sleep(every)
