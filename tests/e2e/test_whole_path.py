"""The whole path as users drive it, through the command line: train, publish, work, submit, report, views."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from PIL import Image

from tests.harness.cli import run_allscore
from tests.helpers import CNMC_SAMPLE, cnmc_cells, require_service
from tests.worker_process import WorkerProcess

pytestmark = pytest.mark.e2e


def run(*args: str, env: dict[str, str], check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_allscore(*args, env=env, check=check, timeout=timeout)


def test_user_path_on_the_embedded_database_with_redis(tmp_path: Path, synth_data: Path) -> None:
    import redis

    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        require_service("Redis", False, str(exc))
    env = {
        "ALLSCORE_HOME": str(tmp_path / "home"),
        "ALLSCORE_BROKER_URL": "redis://127.0.0.1:6379/0",
        "ALLSCORE_QUEUE": f"e2e-{uuid.uuid4().hex[:8]}",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        # A second model store the operator lists for workers and submitters alike.
        "ALLSCORE_MODEL_STORES": json.dumps({"other": str(tmp_path / "other-store")}),
    }

    # ML engineer: train, inspect, promote.
    ref = run("train", str(synth_data), "--arch", "tiny", "--epochs", "3", env=env).stdout.strip().splitlines()[-1]
    run("models", "promote", ref, "production", env=env)
    assert run("db", "upgrade", env=env).stdout.startswith("database at revision")

    # Lab pipeline: a slide folder, the real cells, and a folder holding a broken file.
    slide = tmp_path / "slide"
    slide.mkdir()
    for path in sorted((synth_data / "fold_2").rglob("*.bmp"))[:20]:
        shutil.copy(path, slide / path.name)
    cnmc_cells()
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(next(slide.iterdir()), broken / "good.bmp")
    (broken / "broken.bmp").write_bytes(b"BM" + b"\x00" * 10)

    worker = WorkerProcess(env, tmp_path / "worker.log", concurrency=2).start()
    try:
        job = run("submit", "slide-1", str(slide), "--model", "allscore@staging", "--wait", env=env, check=False)
        assert job.returncode == 3  # no such alias: a clear error, nothing queued
        assert "no alias allscore@staging" in job.stderr and "Traceback" not in job.stderr

        manifest = tmp_path / "run.csv"
        manifest.write_text(f"sample_id,uri\nslide-1,{slide}\nreal,{CNMC_SAMPLE}\nbroken,{broken}\n")
        done = run("submit", "--manifest", str(manifest), "--model", "allscore@production", "--wait", env=env)
        job_id = done.stdout.strip().splitlines()[-1]

        # A model from another store the workers list: the task names the store, never its path.
        other = tmp_path / "other-store"
        show = json.loads(run("models", "show", ref, env=env).stdout)
        version_dir = tmp_path / "home" / "models" / show["name"] / show["version"]
        shutil.copytree(version_dir, other / "elsewhere" / "v9")
        (other / "elsewhere" / "v9" / "manifest.json").write_text(
            json.dumps({**show, "name": "elsewhere", "version": "v9"})
        )
        run("submit", "slide-2", str(slide), "--model", "elsewhere:v9", "--store", "other", "--wait", env=env)
        unlisted = run("submit", "slide-3", str(slide), "--store", str(tmp_path), env=env, check=False)
        assert unlisted.returncode == 3 and "not one the workers know" in " ".join(unlisted.stderr.split())
    finally:
        worker.stop()

    status = run("status", "--job", job_id, env=env).stdout
    assert status.count("done") == 3
    rows = {r["sample_id"]: r for r in json.loads(run("report", "--job", job_id, "--format", "json", env=env).stdout)}
    assert (rows["slide-1"]["n_cells"], rows["real"]["n_cells"], rows["broken"]["n_cells"]) == (20, 24, 2)
    assert rows["broken"]["n_failed"] == 1 and rows["broken"]["all_fraction"] in (0.0, 1.0)
    assert rows["slide-1"]["model_version"] == ref
    (other_row,) = json.loads(run("report", "slide-2", "--format", "json", env=env).stdout)
    assert (other_row["status"], other_row["model_version"], other_row["n_cells"]) == ("done", "elsewhere:v9", 20)
    csv = run("report", "slide-1", "--format", "csv", env=env).stdout.splitlines()
    assert csv[0].startswith("sample_id,job_id,status,model_version,n_cells")

    montages = tmp_path / "montages"
    run("report", "--job", job_id, "--montage", str(montages), env=env)
    pngs = sorted(montages.glob("*.png"))
    assert len(pngs) == 3
    with Image.open(next(p for p in pngs if p.name.startswith("real"))) as im:
        assert im.width >= 5 * 104 and im.height > 104  # 24 thumbnails in a grid, with a header

    # Analyst: the views in the embedded SQLite database.
    db = sqlite3.connect(tmp_path / "home" / "allscore.db")
    n_cells, n_errors = db.execute(
        "SELECT count(*), sum(error IS NOT NULL) FROM cell_results WHERE sample_id = 'broken'"
    ).fetchone()
    assert (n_cells, n_errors) == (2, 1)
    (fraction,) = db.execute("SELECT all_fraction FROM sample_results WHERE sample_id = 'slide-1'").fetchone()
    (k,) = db.execute("SELECT sum(is_all) FROM cell_results WHERE sample_id = 'slide-1'").fetchone()
    assert fraction == pytest.approx(k / 20)


def test_the_demo_scores_its_slides_in_order_with_the_embedded_broker(tmp_path: Path) -> None:
    env = {"ALLSCORE_BROKER_URL": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("ALLSCORE_HOME", None)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "allscore", "demo", "--workdir", str(tmp_path / "demo"), "--epochs", "6"],
        env={k: v for k, v in {**os.environ, **env}.items() if k != "ALLSCORE_HOME"},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embedded" in result.stderr
    table = result.stdout
    for name in ("demo-low", "demo-mid", "demo-high", "demo-fields"):
        line = next(ln for ln in table.splitlines() if name in ln)
        assert "done" in line
    assert len(list((tmp_path / "demo" / "montages").glob("*.png"))) == 4
    # The slide given as fields: its white cells were found (rows in the view) and each field was drawn.
    db = sqlite3.connect(tmp_path / "demo" / "allscore.db")
    # The three slides of cells were written with ALL fractions 5 %, 25 % and 60 %: the scores keep their order.
    # (Two epochs were too few: every cell was called ALL and every fraction was 1.0; six separate them.)
    fractions = dict(
        db.execute("SELECT sample_id, all_fraction FROM sample_results WHERE sample_id LIKE 'demo-%'").fetchall()
    )
    assert fractions["demo-low"] < fractions["demo-mid"] < fractions["demo-high"], fractions
    (n_found,) = db.execute("SELECT count(*) FROM cell_results WHERE sample_id = 'demo-fields'").fetchone()
    (n_fields,) = db.execute("SELECT n_fields FROM sample_results WHERE sample_id = 'demo-fields'").fetchone()
    assert n_fields == 6 and n_found >= 6 * 12 * 0.8
    assert len(list((tmp_path / "demo" / "overlays").rglob("*.png"))) == 6
    assert list(cwd.iterdir()) == []  # everything stays under the work folder, nothing lands where it ran
