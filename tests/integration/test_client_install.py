"""A lab pipeline's install: `pip install allscore[client]` into a fresh venv, dependencies resolved by pip, on a
machine without a C compiler (CC points at `false`), gives submit, status and wait_for_job without TensorFlow;
it submits as the least-privilege role allscore_submitter and a real worker scores the sample."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from db.engine import parse_url
from tests.harness.install import venv_with
from tests.harness.services import upgrade_with_new_passwords
from tests.integration.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(900)
def test_the_client_extra_installs_without_tensorflow_or_a_compiler_and_submits(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir, names = venv_with("client", tmp_path, compiler=False)
    assert {"allscore", "celery", "sqlalchemy", "psycopg", "boto3"} <= names
    assert not names & {"tensorflow", "tensorflow-cpu", "keras", "scipy", "scikit-image", "opencv-python-headless"}
    probe = subprocess.run(
        [str(bin_dir / "python"), "-c", "import core.imaging as i; print(i.decode_kernel_available())"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert probe.stdout.strip() == "False", probe.stderr  # no compiler: Pillow decodes, and it installed anyway

    stack.start_worker(concurrency=1)
    slide = tmp_path / "slide"
    slide.mkdir()
    for path in sorted((stack.model.data / "fold_0").rglob("*.bmp"))[:5]:
        shutil.copy(path, slide / path.name)
    # The pipeline's environment: the broker, the database as allscore_submitter with the password the operator's
    # `allscore db upgrade` gave it (a role is NOLOGIN until then; roles are the whole server's, so the test sets it
    # rather than finding it set by an earlier test), the workers' model store to resolve the model in. Nothing of
    # the test's own venv.
    (password,) = upgrade_with_new_passwords(stack.pg_url, monkeypatch, "ALLSCORE_SUBMITTER_DB_PASSWORD").values()
    submitter_url = parse_url(stack.pg_url).set(username="allscore_submitter", password=password)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "ALLSCORE_HOME": str(tmp_path / "client-home"),
        "ALLSCORE_DATABASE_URL": submitter_url.render_as_string(hide_password=False),
        "ALLSCORE_BROKER_URL": stack.redis_url,
        "ALLSCORE_QUEUE": stack.queue,
        "ALLSCORE_MODEL_STORE": stack.model.store,
    }

    def client(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(bin_dir / "allscore"), *args], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
        )

    version = client("--version")
    assert version.returncode == 0 and version.stdout.startswith("allscore "), version.stderr
    run = client("submit", "CLIENT-1", str(slide), "--model", stack.model.ref, "--wait", "--timeout", "180")
    assert run.returncode == 0, run.stderr
    job = run.stdout.strip().splitlines()[-1]
    status = client("status", "--job", job, "--json")
    assert status.returncode == 0, status.stderr
    (row,) = json.loads(status.stdout)
    assert (row["sample_id"], row["status"], row["n_cells"], row["n_failed"]) == ("CLIENT-1", "done", 5, 0)
    # The Python client in the same venv: submit and wait.
    script = (
        "from worker.client import submit_sample, wait_for_job\n"
        f"job = submit_sample('CLIENT-2', [{str(slide)!r}], model_ref={stack.model.ref!r})\n"
        "(row,) = wait_for_job(job, timeout=180)\n"
        "print(row['status'], row['n_cells'])\n"
    )
    py = subprocess.run(
        [str(bin_dir / "python"), "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert py.returncode == 0, py.stderr
    assert py.stdout.split() == ["done", "5"]
    # Nothing of TensorFlow was ever imported by the client.
    assert "tensorflow" not in run.stderr.lower()
