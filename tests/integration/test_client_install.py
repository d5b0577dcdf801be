"""A lab pipeline's install: `pip install allscore[client]` into a fresh venv, dependencies resolved by pip, on a
machine without a C compiler (CC points at `false`), gives submit, status and wait_for_job without TensorFlow;
it submits as the least-privilege role allscore_submitter and a real worker scores the sample."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from db.engine import parse_url
from tests.helpers import REPO_ROOT
from tests.integration.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# What the Dockerfile copies to build the wheel: the package's own files, nothing built here.
SOURCES = ("pyproject.toml", "README.md", "allscore", "core", "trainer", "worker", "db")


def _source_copy(dest: Path) -> Path:
    for name in SOURCES:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
        else:
            shutil.copy(src, dest / name)
    return dest


@pytest.mark.timeout(900)
def test_the_client_extra_installs_without_tensorflow_or_a_compiler_and_submits(stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    source = _source_copy(tmp_path / "src")
    venv = tmp_path / "client-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    bin_dir = venv / "bin"
    no_compiler = {**os.environ, "CC": "false", "LDSHARED": "false", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for name in ("VIRTUAL_ENV", "PYTHONPATH"):
        no_compiler.pop(name, None)
    install = subprocess.run(
        [str(bin_dir / "pip"), "install", "--quiet", f"{source}[client]"],
        env=no_compiler,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    installed = subprocess.run([str(bin_dir / "pip"), "list", "--format=json"], capture_output=True, text=True)
    names = {p["name"].lower() for p in json.loads(installed.stdout)}
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
    # The pipeline's environment: the broker, the database as allscore_submitter (this server trusts local logins),
    # the workers' model store to resolve the model in. Nothing of the test's own venv.
    submitter_url = parse_url(stack.pg_url).set(username="allscore_submitter", password=None)
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
