"""`allscore demo`: the whole path on one machine, with no server needed.

Synthetic cells -> train -> publish to a local store -> a real Celery worker (Redis if ALLSCORE_BROKER_URL
answers, else an embedded filesystem broker) -> three samples with known ALL fractions -> the report.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from core.console import stderr_console, stdout_console
from core.settings import get_settings, redact, reset_settings_cache

SAMPLES = {"demo-low": 0.05, "demo-mid": 0.25, "demo-high": 0.60}
CELLS_PER_SAMPLE = 80
# One slide given as microscope fields (synthetic smears): the worker finds and cuts out the white cells.
FIELDS_SAMPLE = "demo-fields"
FIELDS = 6
CELLS_PER_FIELD = 12


def _redis_answers(url: str) -> bool:
    if not url.startswith(("redis://", "rediss://")):
        return False
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _start_worker(workdir: Path, console: Any) -> subprocess.Popen[bytes]:
    log = (workdir / "worker.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "allscore", "worker", "--concurrency=2"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    with console.status("starting 2 worker processes"):
        while time.monotonic() < deadline:
            text = (workdir / "worker.log").read_text(errors="replace")
            if "ready." in text:
                return proc
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited ({proc.returncode}); see {workdir / 'worker.log'}")
            time.sleep(0.3)
    proc.terminate()
    raise RuntimeError(f"the worker did not start in 90 s; see {workdir / 'worker.log'}")


def _write_fields(folder: Path) -> float:
    """Synthetic smear fields for one slide; returns the true ALL fraction of its whole (uncut) white cells."""
    import csv

    from trainer.synth_fields import synthesize_fields

    synthesize_fields(folder, fields=FIELDS, cells_per_field=CELLS_PER_FIELD, all_fraction=0.25, seed=7)
    with (folder / "truth.csv").open() as fh:
        whole = [row for row in csv.DictReader(fh) if row["edge"] == "0"]
    return sum(row["label"] == "all" for row in whole) / len(whole)


def run_demo(workdir: Path, *, epochs: int = 30, fresh: bool = False) -> None:
    """Run the whole path under `workdir` and print the report beside the true fractions."""
    console = stderr_console()
    out = stdout_console()
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir.resolve()
    os.environ["ALLSCORE_HOME"] = str(workdir)
    for key in ("ALLSCORE_DATABASE_URL", "ALLSCORE_MODEL_STORE"):
        os.environ.pop(key, None)  # the demo runs on the embedded defaults
    broker = os.environ.get("ALLSCORE_BROKER_URL", "")
    if _redis_answers(broker):
        os.environ["ALLSCORE_QUEUE"] = "allscore-demo"
        console.print(f"broker: Redis at {broker}")
    else:
        os.environ["ALLSCORE_BROKER_URL"] = "filesystem://"
        console.print("broker: embedded (kombu filesystem transport; set ALLSCORE_BROKER_URL to use Redis)")
    reset_settings_cache()
    settings = get_settings()
    started = time.perf_counter()

    from db.migrate import upgrade
    from trainer.synth import synthesize, write_sample
    from trainer.train import TrainConfig, publish, train_model

    data = workdir / "data"
    if not data.exists():
        with console.status("writing a SYNTHETIC C-NMC-layout data set (12 subjects)"):
            synthesize(data, subjects=12, cells=60, seed=0)
    console.rule("training (seed architecture, 64x64, validation on held-out subjects)")
    version = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    outcome = train_model(data, TrainConfig(name="demo", epochs=epochs, seed=0, version=version), console)
    manifest = publish(outcome)
    from core.artifact import Registry

    Registry().promote(manifest.ref, "production")
    v = manifest.validation
    console.print(
        f"published {manifest.ref} to {settings.model_store} as demo@production: weighted F1 "
        f"{v.weighted_f1:.3f}, AUC {v.auc or 0:.3f} on {v.n_subjects} held-out synthetic subjects"
    )

    upgrade()
    samples: dict[str, list[str]] = {}
    truth = dict(SAMPLES)
    with console.status("writing three synthetic slides of cells and one of fields, with known ALL fractions"):
        for i, (name, fraction) in enumerate(SAMPLES.items()):
            folder = workdir / "slides" / name
            if folder.exists():
                shutil.rmtree(folder)
            write_sample(folder, CELLS_PER_SAMPLE, fraction, seed=100 + i)
            samples[name] = [str(folder)]
        folder = workdir / "slides" / FIELDS_SAMPLE
        if folder.exists():
            shutil.rmtree(folder)
        truth[FIELDS_SAMPLE] = _write_fields(folder)
        samples[FIELDS_SAMPLE] = [str(folder / "fields")]

    worker = _start_worker(workdir, console)
    try:
        from worker.cli import wait_for_job
        from worker.client import submit_samples

        job = submit_samples(samples, model_ref=manifest.ref, job_id=f"demo-{version}", kind={FIELDS_SAMPLE: "fields"})
        rows = wait_for_job(job, len(samples), timeout=600)
    finally:
        worker.terminate()
        worker.wait(30)

    table = Table(title=f"job {job}: ALL fraction per sample (model {manifest.ref})")
    for col in ("sample", "status", "cells", "true fraction", "ALL fraction", "95% CI", "corrected", "flags"):
        table.add_column(col)
    rows.sort(key=lambda r: truth[r["sample_id"]])
    for r in rows:
        ci = "-" if r["ci_low"] is None else f"{r['ci_low']:.1%} - {r['ci_high']:.1%}"
        table.add_row(
            r["sample_id"],
            str(r["status"]),
            str(r["n_cells"]),
            f"{truth[r['sample_id']]:.1%}",
            "-" if r["all_fraction"] is None else f"{r['all_fraction']:.1%}",
            ci,
            "-" if r["corrected_fraction"] is None else f"{r['corrected_fraction']:.1%}",
            str(r["flags"] or r["error"] or ""),
        )
    out.print(table)

    from db import repository
    from db.engine import make_engine, session_factory
    from worker.report import render_montage, render_overlays

    montages = workdir / "montages"
    overlays = workdir / "overlays"
    with session_factory(make_engine())() as session:
        for r in rows:
            cells = repository.get_cell_results(
                session=session, sample_id=r["sample_id"], model_version=r["model_version"]
            )
            render_montage(r, cells, montages)
            if r.get("kind") == "fields":
                fields = repository.get_field_results(
                    session=session, sample_id=r["sample_id"], model_version=r["model_version"]
                )
                render_overlays(r, cells, overlays, fields=fields)
    out.print(f"montages (one PNG per sample): {montages}")
    out.print(f"field overlays (one PNG per field, cells outlined by call): {overlays}")
    out.print(f"results database: {redact(settings.database_url)}  (views sample_results, cell_results, field_results)")
    out.print(
        f"demo finished in {(time.perf_counter() - started) / 60:.1f} min. The data are synthetic: "
        "these figures say nothing about real slides."
    )
