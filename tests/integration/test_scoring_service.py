"""The scoring service on real parts: Redis, PostgreSQL, an S3 server over HTTP and a prefork Celery worker."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from core.artifact import Registry, load_keras
from core.imaging import decode_image
from core.settings import Settings, get_settings, reset_settings_cache
from core.storage import store_for
from db.engine import make_engine
from tests.fixtures import PublishedModel
from tests.harness.oracles import wilson_by_inverting_the_score_test
from tests.helpers import CNMC_SAMPLE, cnmc_cells
from tests.worker_process import WorkerProcess
from worker.cli import wait_for_job
from worker.client import submit_sample, submit_samples

pytestmark = pytest.mark.integration

FRACTIONS = {"low": 0.1, "mid": 0.5, "high": 0.9}
CELLS_PER_SAMPLE = 40


@pytest.fixture
def service(
    tmp_path: Path,
    s3_bucket: str,
    s3_settings: Settings,
    pg_url: str,
    redis_url: str,
    tiny_model: PublishedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[dict[str, str]]:
    """Settings for a whole deployment on this machine, the model published to S3, and a running worker."""
    env = {
        "ALLSCORE_HOME": str(tmp_path / "home"),
        "ALLSCORE_DATABASE_URL": pg_url,
        "ALLSCORE_BROKER_URL": redis_url,
        "ALLSCORE_QUEUE": f"allscore-test-{uuid.uuid4().hex[:8]}",
        "ALLSCORE_MODEL_STORE": f"{s3_bucket}/models",
        "ALLSCORE_S3_ENDPOINT_URL": s3_settings.s3_endpoint_url or "",
        "ALLSCORE_BATCH_SIZE": "16",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_settings_cache()
    local = Registry(tiny_model.store)
    model_file, manifest = local.fetch(tiny_model.ref)
    Registry().publish(model_file, manifest)
    worker = WorkerProcess(env, tmp_path / "worker.log", concurrency=2).start()
    env["log"] = str(worker.log_path)
    try:
        yield env
    finally:
        worker.stop()
        env["model_loads"] = repr(dict(worker.model_loads()))
        (tmp_path / "loads.txt").write_text(env["model_loads"])


def _upload_sample(bucket: str, name: str, fraction: float, tmp_path: Path, seed: int) -> list[Path]:
    from trainer.synth import write_sample

    paths = write_sample(tmp_path / name, CELLS_PER_SAMPLE, fraction, seed=seed)
    store = store_for(bucket)
    for path in paths:
        store.upload(path, f"{bucket}/slides/{name}/{path.name}")
    return paths


def _truth(model: PublishedModel, images: list[bytes], sens: float, spec: float) -> dict[str, float]:
    """The expected result, computed here from the model's own outputs and the formulas, not by allscore."""
    keras_model = load_keras(Path(Registry(model.store).fetch(model.ref)[0]))
    x = np.stack([decode_image(b, model.manifest.input_size) for b in images])
    p = np.asarray(keras_model(x, training=False)).reshape(-1)
    k = int(np.sum(p >= model.manifest.threshold))
    n = len(p)
    low, high = wilson_by_inverting_the_score_test(k, n)
    rg = min(1.0, max(0.0, (k / n + spec - 1) / (sens + spec - 1)))
    return {
        "n_all": k,
        "fraction": k / n,
        "ci_low": low,
        "ci_high": high,
        "corrected": rg,
        "mean_p": float(p.mean()),
    }


def test_worker_scores_samples_end_to_end(
    service: dict[str, str], s3_bucket: str, tiny_model: PublishedModel, tmp_path: Path
) -> None:
    uploaded = {
        name: _upload_sample(s3_bucket, name, f, tmp_path, seed=i) for i, (name, f) in enumerate(FRACTIONS.items())
    }
    samples = {name: [f"{s3_bucket}/slides/{name}/"] for name in FRACTIONS}
    # The real C-NMC cells, from a local folder, and a sample with broken files next to good ones.
    cnmc_cells()
    samples["cnmc"] = [str(CNMC_SAMPLE)]
    store = store_for(s3_bucket)
    good = uploaded["mid"][:5]
    for path in good:
        store.upload(path, f"{s3_bucket}/broken/{path.name}")
    store.write_bytes(f"{s3_bucket}/broken/zero.bmp", b"")
    store.write_bytes(f"{s3_bucket}/broken/truncated.bmp", good[0].read_bytes()[:2000])
    store.write_bytes(f"{s3_bucket}/broken/notes.png", b"%PDF-1.4\n this is not an image")
    samples["broken"] = [f"{s3_bucket}/broken/", f"{s3_bucket}/broken/missing.bmp"]

    job = submit_samples(samples, model_ref=tiny_model.ref)
    rows = {r["sample_id"]: r for r in wait_for_job(job, len(samples), timeout=180)}
    assert {r["status"] for r in rows.values()} == {"done"}, rows

    sens = tiny_model.manifest.validation.sensitivity
    spec = tiny_model.manifest.validation.specificity
    assert sens is not None and spec is not None
    for name in FRACTIONS:
        truth = _truth(tiny_model, [p.read_bytes() for p in uploaded[name]], sens, spec)
        row = rows[name]
        assert (row["n_cells"], row["n_failed"], row["n_all"]) == (CELLS_PER_SAMPLE, 0, truth["n_all"])
        assert row["all_fraction"] == pytest.approx(truth["fraction"])
        assert row["ci_low"] == pytest.approx(truth["ci_low"]) and row["ci_high"] == pytest.approx(truth["ci_high"])
        assert row["corrected_fraction"] == pytest.approx(truth["corrected"])
        assert row["mean_p_all"] == pytest.approx(truth["mean_p"], abs=1e-4)
        assert row["model_version"] == tiny_model.ref
    # The model separates the synthetic slides in the right order (it was trained on synthetic cells).
    assert rows["low"]["all_fraction"] < rows["mid"]["all_fraction"] < rows["high"]["all_fraction"]

    # Real cells: the real file format is read and scored; no claim about accuracy on them.
    assert (rows["cnmc"]["n_cells"], rows["cnmc"]["n_failed"]) == (24, 0)

    broken = rows["broken"]
    assert (broken["n_cells"], broken["n_failed"]) == (9, 4)
    engine = make_engine(service["ALLSCORE_DATABASE_URL"])
    with engine.connect() as conn:
        cells = conn.execute(text("SELECT image_uri, p_all, error FROM cell_results WHERE sample_id = 'broken'")).all()
        errors = {uri.rsplit("/", 1)[1]: err for uri, p, err in cells if err}
        assert set(errors) == {"zero.bmp", "truncated.bmp", "notes.png", "missing.bmp"}
        assert sum(1 for _, p, err in cells if p is not None and err is None) == 5

        # Resubmitting a sample with the same model replaces its rows; nothing is duplicated.
        before = conn.execute(text("SELECT count(*) FROM cell_results WHERE sample_id = 'mid'")).scalar_one()
    job2 = submit_sample("mid", samples["mid"], model_ref=tiny_model.ref)
    (row,) = wait_for_job(job2, 1, timeout=120)
    assert row["status"] == "done"
    with engine.connect() as conn:
        after = conn.execute(text("SELECT count(*) FROM cell_results WHERE sample_id = 'mid'")).scalar_one()
        n_rows = conn.execute(text("SELECT count(*) FROM sample_results WHERE sample_id = 'mid'")).scalar_one()
        dupes = conn.execute(
            text(
                "SELECT count(*) FROM (SELECT sample_id, image_uri, model_version FROM cell_results "
                "GROUP BY 1, 2, 3 HAVING count(*) > 1) d"
            )
        ).scalar_one()
    assert (before, after, n_rows, dupes) == (CELLS_PER_SAMPLE, CELLS_PER_SAMPLE, 1, 0)
    engine.dispose()

    # One model load per worker process that did work, counted from the worker's log.
    log = Path(service["log"]).read_text()
    import re

    loads: dict[str, int] = {}
    for pid in re.findall(r"model loaded: \S+ in pid (\d+)", log):
        loads[pid] = loads.get(pid, 0) + 1
    assert loads and all(n == 1 for n in loads.values()), loads
    assert len(loads) <= 2
    assert get_settings().queue.startswith("allscore-test-")
