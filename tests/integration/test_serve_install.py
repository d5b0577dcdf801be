"""The TensorFlow-free images: `pip install 'allscore[serve,review]'` into a fresh venv installs no TensorFlow, Keras
or training tools; a worker started from that venv (the `worker-onnx` image), on ONNX Runtime, scores a slide of
cells and a slide of the 12 real BCCD fields over Redis, PostgreSQL and S3, and `allscore review` from it (the
review image) shows the field sample and draws its overlays.

The tiny model was trained on synthetic cells: its calls on the BCCD cells mean nothing and are not read. What is
checked is what an operator of that image checks: nothing of TensorFlow installed, both samples done, every field
read with its white cells found and counted, and the process that scored holding ONNX Runtime from the venv.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest

from core.storage import store_for
from tests.harness.install import venv_with
from tests.harness.review_site import ReviewServer, login
from tests.integration.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BCCD = Path(__file__).resolve().parents[1] / "data" / "bccd" / "JPEGImages"
PASSWORD = "alice-password-1"
TRAINING_ONLY = {"tensorflow", "tensorflow-cpu", "keras", "tf2onnx", "onnx", "matplotlib", "tensorboard"}


@pytest.mark.timeout(900)
def test_the_serve_and_review_extras_have_no_tensorflow_and_score_and_show_cells_and_fields(
    stack: Stack, tmp_path: Path
) -> None:
    bin_dir, names = venv_with("serve,review", tmp_path)
    assert {"allscore", "celery", "onnxruntime", "opencv-python-headless", "scikit-image", "alembic"} <= names
    assert not names & TRAINING_ONLY, sorted(names & TRAINING_ONLY)
    probe = subprocess.run(
        [str(bin_dir / "python"), "-c", "import importlib.util as u; print(u.find_spec('tensorflow'))"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert probe.stdout.strip() == "None", probe.stderr
    # The image's other jobs need no model either: migrating a database, and the sweeper's one pass.
    jobs_env = {**os.environ, "ALLSCORE_HOME": str(tmp_path / "jobs-home")}
    jobs_env["ALLSCORE_DATABASE_URL"] = f"sqlite:///{tmp_path / 'jobs.db'}"
    for args in (["db", "upgrade"], ["sweep"]):
        job = subprocess.run(
            [str(bin_dir / "allscore"), *args], env=jobs_env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert job.returncode == 0, (args, job.stderr[-2000:])

    cells = stack.upload_sample("serve-cells", 12, fraction=0.5, seed=5)
    bucket = store_for(stack.bucket)
    prefix = f"{stack.bucket}/slides/serve-fields/"
    fields = sorted(BCCD.glob("*.jpg"))
    for path in fields:
        bucket.upload(path, prefix + path.name)
    # Run from tmp_path, so that the venv's installed package is what runs, not this checkout's sources.
    worker = stack.start_worker(
        concurrency=1, python=str(bin_dir / "python"), cwd=tmp_path, ALLSCORE_RUNTIME="onnxruntime"
    )

    job = stack.submit({"serve-cells": [cells], "serve-fields": [prefix]}, kind={"serve-fields": "fields"})
    rows = stack.wait_final(job, 2, 300)
    assert {s: (r["status"], r["n_failed"]) for s, r in rows.items()} == {
        "serve-cells": ("done", 0),
        "serve-fields": ("done", 0),
    }, rows
    assert rows["serve-cells"]["n_cells"] == 12
    # Each BCCD field holds one or two white cells (mostly neutrophils: `other`, counted, not scored by the model).
    by_field = stack.query("SELECT * FROM field_results WHERE sample_id = 'serve-fields' ORDER BY field_index")
    assert [f["field_uri"].rsplit("/", 1)[1] for f in by_field] == [p.name for p in fields]
    assert all(f["error"] is None and f["n_found"] >= 1 for f in by_field), by_field
    assert all(f["n_scored"] + f["n_other"] + f["n_edge"] == f["n_found"] for f in by_field), by_field
    # A row per white cell found, with its kind; the model's p(all) on the lymphoid ones it scored.
    cells_found = stack.query("SELECT cell_kind, p_all FROM cell_results WHERE sample_id = 'serve-fields'")
    assert len(cells_found) == sum(f["n_found"] for f in by_field)
    scored = [c for c in cells_found if c["p_all"] is not None]
    assert rows["serve-fields"]["n_cells"] == len(scored) == sum(f["n_scored"] for f in by_field)
    assert all(c["cell_kind"] == "lymphoid" for c in scored), cells_found
    (line,) = [ln for ln in worker.log().splitlines() if f"model loaded: {stack.model.ref}" in ln]
    assert "runtime onnxruntime, float32 (tensorflow not imported in this process)" in line, line
    # The process that scored is the venv's: its ONNX Runtime library is mapped from the venv, no TensorFlow is.
    pid = int(re.search(r"in pid (\d+)", line).group(1))  # type: ignore[union-attr]
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert f"{bin_dir.parent}/lib/" in maps and "onnxruntime" in maps and "tensorflow" not in maps

    # The review app from the same venv: log in, open the field sample, and get each field's overlay picture.
    env = {
        **stack.worker_env(),
        "ALLSCORE_HOME": str(tmp_path / "review-home"),
        "ALLSCORE_REVIEW_SECRET_KEY": "k" * 16 + uuid.uuid4().hex,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }
    added = subprocess.run(
        [str(bin_dir / "allscore"), "users", "add", "alice", "--password-stdin"],
        input=PASSWORD + "\n",
        env={**os.environ, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert added.returncode == 0, added.stderr
    server = ReviewServer(env, tmp_path / "review.log", python=str(bin_dir / "python"), cwd=tmp_path).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert login(client, "alice", PASSWORD).status_code in (200, 303)
            page = client.get("/sample", params={"id": "serve-fields", "model": stack.model.ref})
            assert page.status_code == 200 and "serve-fields" in page.text
            for f in by_field:
                params = {"id": "serve-fields", "model": stack.model.ref, "field": f["field_uri"]}
                picture = client.get("/overlay", params=params)
                assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG"), f["field_uri"]
    finally:
        server.stop()
    assert "tensorflow" not in server.log().lower()
