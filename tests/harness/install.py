"""Installing allscore as a user does: the package's own files copied (what the Dockerfile copies to build the
wheel, nothing built here), then `pip install 'SOURCE[extras]'` into a fresh venv, dependencies resolved by pip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO_ROOT

SOURCES = ("pyproject.toml", "README.md", "allscore", "core", "trainer", "worker", "db")


def source_copy(dest: Path) -> Path:
    """The package's sources in `dest` (no compiled kernel, no caches)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in SOURCES:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
        else:
            shutil.copy(src, dest / name)
    return dest


def venv_with(extras: str, tmp_path: Path, *, compiler: bool = True) -> tuple[Path, set[str]]:
    """A fresh venv in tmp_path with `allscore[extras]` installed from a source copy; (its bin dir, the lower-case
    names of every installed distribution). compiler=False points CC at `false`, as on a machine without one."""
    source = source_copy(tmp_path / "src")
    venv = tmp_path / f"{extras.replace(',', '-')}-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    bin_dir = venv / "bin"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if not compiler:
        env.update(CC="false", LDSHARED="false")
    for name in ("VIRTUAL_ENV", "PYTHONPATH"):
        env.pop(name, None)
    install = subprocess.run(
        [str(bin_dir / "pip"), "install", "--quiet", f"{source}[{extras}]"],
        env=env,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    listed = subprocess.run([str(bin_dir / "pip"), "list", "--format=json"], capture_output=True, text=True)
    return bin_dir, {p["name"].lower() for p in json.loads(listed.stdout)}
